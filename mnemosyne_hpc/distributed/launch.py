"""Find this process's rank, agree on a rendezvous, and join torch.distributed.

Launchers set different variables; MPI ones win because under `mpirun` inside a SLURM
allocation every rank also sees `SLURM_PROCID=0`. Inside an sbatch script but outside an
`srun` step only `SLURM_PROCID`/`SLURM_NTASKS` exist: we ignore them (no `SLURM_STEP_NUM_TASKS`).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# (launcher, rank, world size, local rank) variables, in precedence order.
_RANK_VARIABLES = [
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
]


@dataclass(frozen=True)
class RankInfo:
    launcher: str  # openmpi | mpich | slurm | torchrun | single
    rank: int
    world_size: int
    local_rank: int


def discover_rank(env=os.environ) -> RankInfo:
    for launcher, rank, size, local in _RANK_VARIABLES:
        if rank in env and size in env:
            return RankInfo(launcher, int(env[rank]), int(env[size]), int(env.get(local, 0)))
    return RankInfo("single", 0, 1, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _slurm_first_host(nodelist: str) -> str:
    import subprocess

    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.split():
        return out.stdout.split()[0]
    return nodelist.split(",")[0].split("[")[0]


def rendezvous_address(info: RankInfo, env=os.environ) -> tuple[str, int]:
    """MASTER_ADDR/PORT if given; else agree through MPI (rank 0 picks a port) or SLURM's job id."""
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if info.world_size == 1:
        return "127.0.0.1", _free_port()
    if info.launcher in ("openmpi", "mpich"):
        from mpi4py import MPI  # only for the rendezvous: MPI busy-polls, so no MPI in the loop

        comm = MPI.COMM_WORLD
        if comm.Get_size() != info.world_size:
            raise RuntimeError(
                f"mpi4py sees {comm.Get_size()} ranks but the launcher says {info.world_size}; "
                "is mpi4py built for the MPI that started this job?"
            )
        address = ("127.0.0.1" if on_one_host(info, env) else socket.gethostname(), _free_port())
        return comm.bcast(address if info.rank == 0 else None, root=0)
    if info.launcher == "slurm":  # a port from the job and step ids, so steps running side by side differ
        host = _slurm_first_host(env["SLURM_STEP_NODELIST"])
        step = int(env.get("SLURM_JOB_ID", "0")) * 64 + int(env.get("SLURM_STEP_ID", "0"))
        return host, 20000 + step % 20000
    raise RuntimeError("no rendezvous: set MASTER_ADDR and MASTER_PORT")


# Per launcher, the number of this job's ranks on this host. SLURM's SLURM_NTASKS_PER_NODE is the
# allocation's, not the step's (`srun -N 2 -n 2` in an allocation of 2 tasks per node keeps 2): the
# step's node count is what tells.
_LOCAL_SIZE_VARIABLES = {
    "openmpi": "OMPI_COMM_WORLD_LOCAL_SIZE",
    "mpich": "MPI_LOCALNRANKS",
    "torchrun": "LOCAL_WORLD_SIZE",
}


def on_one_host(info: RankInfo, env=os.environ) -> bool:
    """Whether the launcher says every rank runs on this host (unknown counts as no)."""
    if info.world_size == 1:
        return True
    if info.launcher == "slurm":
        return env.get("SLURM_STEP_NUM_NODES") == "1"
    return ranks_on_this_host(info, env) == info.world_size


def ranks_on_this_host(info: RankInfo, env=os.environ) -> int | None:
    """This job's ranks on this host, where the launcher says (SLURM: the step's tasks per node, as
    "2(x3),1", picked by this node's index)."""
    if info.world_size == 1:
        return 1
    if info.launcher == "slurm":
        counts = []
        for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
            tasks, _, repeat = part.partition("(x")
            if tasks.isdigit():
                counts += [int(tasks)] * int(repeat.rstrip(")") or 1)
        node = int(env.get("SLURM_NODEID", 0))
        return counts[node] if node < len(counts) else None
    local = _LOCAL_SIZE_VARIABLES.get(info.launcher)
    return int(env[local]) if local in env else None


def cpu_threads(info: RankInfo, env=os.environ) -> int:
    """Threads for this rank's CPU kernels: OMP_NUM_THREADS where set, else an equal share of the
    cores this process may run on among this host's ranks. Left to itself torch takes one thread under
    mpirun (it sees MPI_LOCALNRANKS), even for a single rank, and every core under srun."""
    if env.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(env["OMP_NUM_THREADS"]))
    return max(1, len(os.sched_getaffinity(0)) // (ranks_on_this_host(info, env) or 1))


def check_interfaces(env=os.environ) -> None:
    """GLOO_SOCKET_IFNAME names interfaces (comma-separated) that must exist on every host; say which
    is missing here, and what there is, instead of gloo's bare 'no address' later."""
    names = [name for name in env.get("GLOO_SOCKET_IFNAME", "").split(",") if name]
    present = [name for _, name in socket.if_nameindex()]
    missing = [name for name in names if name not in present]
    if missing:
        raise RuntimeError(
            f"GLOO_SOCKET_IFNAME={env['GLOO_SOCKET_IFNAME']}: no interface {', '.join(missing)} on host "
            f"{socket.gethostname()} (it has {', '.join(present)})"
        )


def init_distributed(device: str, backend: str, timeout_s: float) -> RankInfo:
    """Join the default process group; every rank fails within `timeout_s` if a peer is missing."""
    info = discover_rank()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if on_one_host(info):  # keep gloo on loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    check_interfaces()
    addr, port = rendezvous_address(info)
    if info.rank == 0 and info.world_size > 1:
        waiting = f"[rank 0] waiting for {info.world_size} ranks at {addr}:{port} ({timeout_s:g} s)"
        print(waiting, file=sys.stderr, flush=True)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except Exception as e:  # noqa: BLE001 - report which rendezvous failed, then let the caller exit
        raise RuntimeError(
            f"rank {info.rank}/{info.world_size}: rendezvous at {addr}:{port} failed within "
            f"{timeout_s:g}s (a rank never arrived?): {e}"
        ) from e
    _gather_hosts(info, f"{addr}:{port}")
    return info


_hosts: list[str] = []  # every rank's host name, in rank order, once the ranks have joined


def _gather_hosts(info: RankInfo, rendezvous: str) -> None:
    hosts = [""] * info.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    _hosts[:] = hosts
    if info.rank == 0 and len(set(hosts)) > 1:
        print(
            f"[rank 0] {info.world_size} ranks on {len(set(hosts))} hosts ({info.launcher}, rendezvous {rendezvous}): "
            f"{ranks_by_host()}",
            file=sys.stderr,
            flush=True,
        )


def ranks_by_host() -> str:
    """'node0: ranks 0-3; node1: ranks 4-7', or '' before the ranks have joined."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(_hosts):
        by_host.setdefault(host, []).append(rank)
    return "; ".join(f"{host}: rank{'s' * (len(r) > 1)} {_spans(r)}" for host, r in by_host.items())


def _spans(ranks: list[int]) -> str:
    spans, start = [], ranks[0]
    for previous, rank in zip(ranks, ranks[1:] + [None]):
        if rank != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = rank
    return ", ".join(spans)


def fail(message: str) -> None:
    """Print and leave at once: a peer may be gone, so no collective teardown."""
    rank = dist.get_rank() if dist.is_initialized() else discover_rank().rank
    print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
    os._exit(1)
