"""CPU kernels in C, built on first use (`build.py`), with their ctypes bindings."""

from __future__ import annotations

import contextlib
import ctypes

import torch

# The C functions' argument types, as their ctypes declarations name them
PTR, I64, INT, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def profiled(kernel: str):
    """Names a kernel call `mnemosyne::<kernel>` in torch profiles. Only while a profiler runs: a
    range costs tens of microseconds when a decode step's weight streams have left the caches cold."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"mnemosyne::{kernel}")
    return contextlib.nullcontext()


def bf16_rows_on_cpu(*tensors: torch.Tensor) -> bool:
    """What the kernels read: bf16 CPU tensors whose last dimension is contiguous."""
    for t in tensors:  # a loop, not all(...): this runs a few hundred times a decode step
        if t.dtype != torch.bfloat16 or not t.is_cpu or t.stride(-1) != 1:
            return False
    return True
