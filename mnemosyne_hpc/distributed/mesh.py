"""The named (spp, kvp, tp) device mesh and the groups every module uses."""
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


def build_mesh(cfg: ParallelConfig, device: torch.device) -> ParallelContext:
    world = dist.get_world_size()
    shape = (cfg.spp, cfg.kvp, cfg.tp)
    if cfg.spp * cfg.kvp * cfg.tp != world:
        raise ValueError(f"world size {world} != parallel.spp × parallel.kvp × parallel.tp = "
                         f"{cfg.spp} × {cfg.kvp} × {cfg.tp}; launch {cfg.spp * cfg.kvp * cfg.tp} ranks")
    timeout = timedelta(seconds=cfg.timeout_s)
    backend = dist.get_backend()
    options = _group_options(backend, timeout)  # sub-groups otherwise wait 30 minutes for a lost peer
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS,
                            backend_override={name: (backend, options) for name in MESH_DIMS})
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    tp = mesh["tp"]
    return ParallelContext(mesh=mesh, device=device, rank=dist.get_rank(), tp_rank=tp.get_local_rank(),
                           tp_size=tp.size(), tp_group=tp.get_group(), cpu_group=cpu_group)


def _group_options(backend: str, timeout: timedelta):
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options
