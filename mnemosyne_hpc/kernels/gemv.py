"""Matrix-vector products for decode steps on CPU (`gemv.c`), built on first use (see `build.py`)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import I64, PTR, bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import load

SOURCE = Path(__file__).with_name("gemv.c")


@functools.cache
def _library():
    return load(SOURCE, {"gemv": [PTR, I64, I64, PTR, PTR]})


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """One row x [1, in] times weightᵀ ([out, in]) → [1, out], rounded to bf16 as torch's matrix
    products; None where the kernel does not apply (not bf16 on CPU, weight not contiguous, or no
    compiler)."""
    if not (x.shape[0] == 1 and weight.is_contiguous() and bf16_rows_on_cpu(x, weight) and _library() is not None):
        return None
    out_features, in_features = weight.shape
    y = torch.empty(1, out_features, dtype=weight.dtype)
    with profiled("gemv"):
        _library().gemv(weight.data_ptr(), out_features, in_features, x.data_ptr(), y.data_ptr())
    return y
