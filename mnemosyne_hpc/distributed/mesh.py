"""The named (spp, kvp, tp) device mesh and the groups and peers every module uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mnemosyne_hpc.config import ParallelConfig

MESH_DIMS = ("spp", "kvp", "tp")  # outermost to innermost: TP ranks are contiguous


@dataclass
class ParallelContext:
    mesh: DeviceMesh
    device: torch.device
    rank: int
    tp_rank: int
    tp_size: int
    tp_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup  # world group on gloo: step plans and sampled tokens
    stage: int  # this rank's pipeline stage
    num_stages: int
    prev_rank: int | None  # same KVP group and TP position, previous stage: sends us hidden states
    next_rank: int | None
    kvp_rank: int  # this rank's KVP group
    kvp_size: int
    # (first, last) → the group of this rank's (stage, TP position) in KVP groups first … last, for
    # every such range holding this rank: the partial attentions of a request spanning them meet there.
    kvp_groups: dict[tuple[int, int], dist.ProcessGroup]
    sampler_ranks: list[int]  # per KVP group: last stage, TP rank 0, sends sampled tokens to rank 0

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def is_sampler(self) -> bool:
        return self.rank == self.sampler_ranks[self.kvp_rank]


def build_mesh(cfg: ParallelConfig, device: torch.device) -> ParallelContext:
    world = dist.get_world_size()
    shape = (cfg.spp, cfg.kvp, cfg.tp)
    if cfg.spp * cfg.kvp * cfg.tp != world:
        raise ValueError(
            f"world size {world} != parallel.spp × parallel.kvp × parallel.tp = "
            f"{cfg.spp} × {cfg.kvp} × {cfg.tp}; launch {cfg.spp * cfg.kvp * cfg.tp} ranks"
        )
    timeout = timedelta(seconds=cfg.timeout_s)
    backend = dist.get_backend()
    options = _group_options(backend, timeout)  # sub-groups otherwise wait 30 minutes for a lost peer
    mesh = init_device_mesh(
        device.type, shape, mesh_dim_names=MESH_DIMS, backend_override={name: (backend, options) for name in MESH_DIMS}
    )
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    tp = mesh["tp"]
    stage, kvp_index, tp_index = mesh.get_coordinate()
    ranks = mesh.mesh  # [spp, kvp, tp] → global rank
    return ParallelContext(
        mesh=mesh,
        device=device,
        rank=dist.get_rank(),
        tp_rank=tp.get_local_rank(),
        tp_size=tp.size(),
        tp_group=tp.get_group(),
        cpu_group=cpu_group,
        stage=stage,
        num_stages=cfg.spp,
        prev_rank=int(ranks[stage - 1, kvp_index, tp_index]) if stage > 0 else None,
        next_rank=int(ranks[stage + 1, kvp_index, tp_index]) if stage < cfg.spp - 1 else None,
        kvp_rank=kvp_index,
        kvp_size=cfg.kvp,
        kvp_groups=_kvp_range_groups(ranks, (stage, kvp_index, tp_index), timeout),
        sampler_ranks=[int(ranks[cfg.spp - 1, g, 0]) for g in range(cfg.kvp)],
    )


def _kvp_range_groups(ranks: torch.Tensor, coordinate: tuple[int, int, int], timeout: timedelta):
    """A request always spans a contiguous range of KVP groups; make a process group for every range
    of two or more groups at every (stage, TP position). Every rank creates every group, in one order."""
    stage, kvp_index, tp_index = coordinate
    spp, kvp, tp = ranks.shape
    mine = {}
    for first in range(kvp):
        for last in range(first + 1, kvp):
            for s in range(spp):
                for t in range(tp):
                    group = dist.new_group([int(r) for r in ranks[s, first : last + 1, t]], timeout=timeout)
                    if (s, t) == (stage, tp_index) and first <= kvp_index <= last:
                        mine[first, last] = group
    return mine


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """Balanced contiguous split; earlier stages take the extra layers (the last one holds the LM head)."""
    if num_stages > num_layers:
        raise ValueError(f"parallel.spp = {num_stages} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def _group_options(backend: str, timeout: timedelta):
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options
