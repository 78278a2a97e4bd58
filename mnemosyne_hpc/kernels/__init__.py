"""CPU kernels in C, built on first use (`build.py`), with their ctypes bindings."""
from __future__ import annotations

import contextlib

import torch


def profiled(kernel: str):
    """Names a kernel call `mnemosyne::<kernel>` in torch profiles. Only while a profiler runs: a
    range costs tens of microseconds when a decode step's weight streams have left the caches cold."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"mnemosyne::{kernel}")
    return contextlib.nullcontext()


def bf16_rows_on_cpu(*tensors: torch.Tensor) -> bool:
    """What the kernels read: bf16 CPU tensors whose last dimension is contiguous."""
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)
