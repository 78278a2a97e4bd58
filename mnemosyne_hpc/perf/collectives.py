"""Times this machine's collectives against message bytes, as the engine runs them (gloo on CPU, NCCL on
GPUs), for a hardware profile (`perf/machine.py`):

    launch/mpirun.sh -n 2 python -m mnemosyne_hpc.perf.collectives collectives.json [--max-bytes N] [--repeats N]

- send_recv: one rank's hidden states to the next, the SPP hand-over (rank r sends to r + 1 and receives
  from r − 1, every rank at once);
- kvp_merge: every rank's partial attention outputs and log-sum-exps gathered by all and merged exactly,
  one layer's KVP merge (`merge_over_group`), against the bytes each rank contributes.

Each point is the slowest rank's median over back-to-back repeats (a collective ends when its slowest
rank ends). Rank 0 writes {name: {ranks: {"bytes": [...], "ms": [...]}}, "source": ...}.
"""

from __future__ import annotations

import argparse
import json
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


def measure(sizes: list[int], repeats: int) -> dict:
    timed = {"send_recv": {}, "kvp_merge": {}}
    for name, probe in (("send_recv", send_recv), ("kvp_merge", kvp_merge)):
        for nbytes in sizes:
            dist.barrier()
            timed[name][nbytes] = median_time(probe(nbytes), repeats)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, timed)
    return {
        name: {
            str(dist.get_world_size()): {
                "bytes": sizes,
                "ms": [1000 * max(rank[name][b] for rank in gathered) for b in sizes],
            }
        }
        for name in timed
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSON file rank 0 writes")
    parser.add_argument("--max-bytes", type=int, default=BYTES[-1], help="largest message timed")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per point (the median is kept)")
    args = parser.parse_args(argv)
    info = init_distributed("cpu", "gloo", 600)
    if info.world_size < 2:
        parser.error("two ranks or more: launch/mpirun.sh -n 2 python -m mnemosyne_hpc.perf.collectives OUT.json")
    measured = measure([b for b in BYTES if b <= args.max_bytes], args.repeats)
    if info.rank == 0:
        measured["source"] = (
            f"python -m mnemosyne_hpc.perf.collectives on {info.world_size} ranks of this host, gloo, "
            f"{hardware_name(torch.device('cpu'))} per rank, {time.strftime('%Y-%m-%d')}"
        )
        args.out.write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
