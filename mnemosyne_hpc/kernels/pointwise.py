"""RMSNorm, SiLU(gate)·up and the rotary embedding on CPU in one pass each (`pointwise.c`), built
on first use (see `build.py`).

They return None where they do not apply (not bf16 on CPU, or no compiler) and callers use the
torch ops, which round at the same points.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import F32, I64, PTR, bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import load

SOURCE = Path(__file__).with_name("pointwise.c")
FLAGS = ("-mprefer-vector-width=512",)  # whole AVX-512 registers where the CPU has them


@functools.cache
def _library():
    return load(
        SOURCE,
        {
            "rms_norm": [PTR, PTR, I64, I64, I64, PTR, F32, PTR],
            "silu_mul": [PTR, I64, I64, PTR],
            "rope": [PTR, I64, I64, I64, I64, PTR, PTR],
        },
        FLAGS,
    )


def _run(kernel: str, *args) -> None:
    with profiled(kernel):
        getattr(_library(), kernel)(*args)


def _applies(*tensors: torch.Tensor) -> bool:
    return bf16_rows_on_cpu(*tensors) and _library() is not None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | None:
    """weight · bf16(x / rms(x)) for rows x [T, D]; with `residual` (x's shape and strides), first
    x += residual in place. None where the kernel does not apply (nothing is changed then)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if not (
        x.dim() == 2
        and weight.is_contiguous()
        and _applies(*tensors)
        and (residual is None or residual.stride() == x.stride())
    ):
        return None
    rows, dim = x.shape
    out = torch.empty(rows, dim, dtype=x.dtype)
    _run(
        "rms_norm",
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        rows,
        x.stride(0),
        dim,
        weight.data_ptr(),
        eps,
        out.data_ptr(),
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """bf16(bf16(silu(gate)) · up) for contiguous rows gate_up [T, 2I] = [gate | up]; None where the
    kernel does not apply."""
    if not (gate_up.dim() == 2 and gate_up.is_contiguous() and _applies(gate_up)):
        return None
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype)
    _run("silu_mul", gate_up.data_ptr(), rows, width, out.data_ptr())
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """Rotates x [T, H, D] (heads adjacent in a row) in place by cos, signed_sin [T, D] (see
    `TorchBackend.rope_`); False, with x unchanged, where the kernel does not apply."""
    rows, heads, dim = x.shape
    if not (x.stride(1) == dim and cos.is_contiguous() and signed_sin.is_contiguous() and _applies(x, cos, signed_sin)):
        return False
    _run("rope", x.data_ptr(), rows, x.stride(0), heads, dim, cos.data_ptr(), signed_sin.data_ptr())
    return True
