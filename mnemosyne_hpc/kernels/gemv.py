"""Matrix-vector products for decode steps on CPU (`gemv.c`), built on first use (see `build.py`)."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import build

SOURCE = Path(__file__).with_name("gemv.c")


@functools.cache
def _library():
    library = build(SOURCE)
    if library is not None:
        library.gemv.restype = None
        library.gemv.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return library


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] · x [in], rounded to bf16 as `torch.mv`; None where the kernel does not apply
    (not bf16 on CPU, weight not contiguous, or no compiler)."""
    if not (x.dim() == 1 and weight.is_contiguous() and bf16_rows_on_cpu(weight, x) and _library() is not None):
        return None
    out_features, in_features = weight.shape
    y = torch.empty(out_features, dtype=weight.dtype)
    with profiled("gemv"):
        _library().gemv(weight.data_ptr(), out_features, in_features, x.data_ptr(), y.data_ptr())
    return y
