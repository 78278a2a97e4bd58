"""Step plans reach every rank intact, whether they fit the broadcast buffer or not."""

from __future__ import annotations

from ranks import run_ranks

BROADCAST = """
import sys
import torch.distributed as dist
from mnemosyne_hpc.distributed.launch import init_distributed
from mnemosyne_hpc.engine.executor import PLAN_BUFFER_BYTES, broadcast_plan
from mnemosyne_hpc.engine.plan import Chunk, StepPlan
info = init_distributed("cpu", "gloo", 30)
for tokens in (3, PLAN_BUFFER_BYTES):  # the second plan pickles to several buffers' worth
    chunk = Chunk(request_id=7, token_ids=list(range(tokens)), start_pos=5, groups=range(0, 2), sampling=None)
    sent = StepPlan(stages=[[chunk], []], block_tables={7: (0, [[1, 2], [9]])}, released=[3], return_logits=True)
    received = broadcast_plan(sent if info.rank == 0 else None, dist.group.WORLD)
    if received != sent:
        sys.exit(f"rank {info.rank}: plan of {tokens} tokens arrived changed")
print("ok", info.rank)
dist.barrier()
dist.destroy_process_group()
"""


def test_plans_of_any_size_arrive_intact():
    result = run_ranks(3, ["-c", BROADCAST], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 3
