"""Linear layers of a decode step of several sequences, on CPU with AMX (`skinny.c`), built on
first use (see `build.py`)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import I64, PTR, bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import load

SOURCE = Path(__file__).with_name("skinny.c")
MAX_ROWS = 64


@functools.cache
def _library():
    return load(SOURCE, {"skinny_linear": [PTR, I64, I64, PTR, I64, I64, PTR]}, amx=True)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [rows, in] times weightᵀ ([out, in]) → [rows, out], rounded to bf16 as torch's matrix products;
    None where the kernel does not apply (more than MAX_ROWS rows, `in` not a multiple of 32, not bf16
    on CPU, weight not contiguous, no AMX or no compiler)."""
    rows, in_features = x.shape
    if not (
        rows <= MAX_ROWS
        and in_features % 32 == 0
        and weight.is_contiguous()
        and bf16_rows_on_cpu(x, weight)
        and _library() is not None
    ):
        return None
    out_features = weight.shape[0]
    y = torch.empty(rows, out_features, dtype=weight.dtype)
    with profiled("skinny_linear"):
        _library().skinny_linear(
            x.data_ptr(), rows, x.stride(0), weight.data_ptr(), out_features, in_features, y.data_ptr()
        )
    return y
