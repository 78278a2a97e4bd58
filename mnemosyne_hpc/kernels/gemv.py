"""Products of a few rows with a weight matrix, for decode steps on CPU (`gemv.c`), built on first use
(see `build.py`)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import I64, PTR, bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import load

SOURCE = Path(__file__).with_name("gemv.c")
MAX_ROWS = 8  # more rows: each reads W's blocks from cache again; a GEMM (AMX, or torch's) does better


@functools.cache
def _library():
    return load(SOURCE, {"gemv": [PTR, I64, I64, PTR, I64, I64, PTR]})


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [rows, in] (rows <= MAX_ROWS, each contiguous) times weightᵀ ([out, in]) → [rows, out], rounded to
    bf16 as torch's matrix products; None where the kernel does not apply (too many rows, not bf16 on CPU,
    weight not contiguous, or no compiler)."""
    rows = x.shape[0]
    if not (rows <= MAX_ROWS and weight.is_contiguous() and bf16_rows_on_cpu(x, weight) and _library() is not None):
        return None
    out_features, in_features = weight.shape
    y = torch.empty(rows, out_features, dtype=weight.dtype)
    with profiled("gemv"):
        _library().gemv(weight.data_ptr(), out_features, in_features, x.data_ptr(), x.stride(0), rows, y.data_ptr())
    return y
