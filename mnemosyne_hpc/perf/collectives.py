"""Times this machine's collectives against message bytes, as the engine runs them (gloo on CPU, NCCL on
GPUs), for a hardware profile (`perf/machine.py`):

    launch/mpirun.sh -n 2 python -m mnemosyne_hpc.perf.collectives collectives.json

- send_recv: one rank's hidden states to the next, the SPP hand-over (rank r sends to r + 1 and receives
  from r − 1, every rank at once);
- kvp_merge: every rank's partial attention outputs and log-sum-exps gathered by all and merged exactly,
  one layer's KVP merge (`merge_over_group`), against the bytes each rank contributes.

Each point is the slowest rank's median over back-to-back repeats (a collective ends when its slowest
rank ends). Rank 0 writes {name: {ranks: {"bytes": [...], "ms": [...]}}, "source": ...}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mnemosyne_hpc.distributed.launch import init_distributed
from mnemosyne_hpc.model.attention import merge_over_group
from mnemosyne_hpc.perf.hardware import hardware_name
from mnemosyne_hpc.perf.timing import median_time

BYTES = [2**i for i in range(10, 27, 2)]  # 1 KiB … 64 MiB
HEAD_DIM = 127  # a KVP merge row: head_dim outputs and a log-sum-exp in float32, 512 bytes a head here


def send_recv(nbytes: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    x, received = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)

    def fn():
        send = dist.isend(x, dst=rank + 1) if rank + 1 < world else None
        if rank > 0:
            dist.recv(received, src=rank - 1)
        if send is not None:
            send.wait()

    return fn


def kvp_merge(nbytes: int):
    rows = max(1, nbytes // (4 * (HEAD_DIM + 1)))
    out, lse = torch.randn(1, rows, HEAD_DIM), torch.randn(1, rows)
    return lambda: merge_over_group(out, lse, dist.group.WORLD)


def measure(repeats: int) -> dict:
    timed = {"send_recv": {}, "kvp_merge": {}}
    for name, probe in (("send_recv", send_recv), ("kvp_merge", kvp_merge)):
        for nbytes in BYTES:
            dist.barrier()
            timed[name][nbytes] = median_time(probe(nbytes), repeats)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, timed)
    return {
        name: {
            str(dist.get_world_size()): {
                "bytes": BYTES,
                "ms": [1000 * max(rank[name][b] for rank in gathered) for b in BYTES],
            }
        }
        for name in timed
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: launch/mpirun.sh -n RANKS python -m mnemosyne_hpc.perf.collectives OUT.json")
    info = init_distributed("cpu", "gloo", 600)
    if info.world_size < 2:
        sys.exit("collectives need at least two ranks: launch/mpirun.sh -n 2 python -m mnemosyne_hpc.perf.collectives")
    measured = measure(repeats=15)
    if info.rank == 0:
        measured["source"] = (
            f"python -m mnemosyne_hpc.perf.collectives on {info.world_size} ranks of this host, gloo, "
            f"{hardware_name(torch.device('cpu'))} per rank, {time.strftime('%Y-%m-%d')}"
        )
        Path(argv[0]).write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {argv[0]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
