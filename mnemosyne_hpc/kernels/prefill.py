"""Prefill attention on CPU with AMX (`prefill.c`), built for this CPU on first use (see `build.py`).

On CPUs without AMX bf16 tiles (or where the kernel cannot be built) `prefill_attention` returns
None and callers use torch's flash kernel: the same attention, only slower.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import F32, I64, INT, PTR, bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import load

SOURCE = Path(__file__).with_name("prefill.c")
HEAD_DIMS = (64, 128)


FUNCTIONS = {
    "prefill_attention": [PTR, INT, I64, I64, I64, PTR, I64, I64, PTR, I64, I64, INT, I64, INT, INT, F32, PTR, PTR]
}


@functools.cache
def _library():
    return load(SOURCE, FUNCTIONS, amx=True)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """q [Hq, Lq, D] over k, v [Hkv, Lk, D] (bf16, CPU, any row and head strides) → out [Hq, Lq, D],
    lse [Hq, Lq]; `causal` lets row i see keys up to i + Lk − Lq. None where the kernel does not apply."""
    hq, lq, d = q.shape
    hkv, lk = k.shape[:2]
    if not (bf16_rows_on_cpu(q, k, v) and d in HEAD_DIMS and lk >= (lq if causal else 1) and _library() is not None):
        return None
    out = torch.empty(hq, lq, d, dtype=torch.bfloat16)
    lse = torch.empty(hq, lq, dtype=torch.float32)
    with profiled("prefill_attention"):
        _library().prefill_attention(
            q.data_ptr(),
            hq,
            lq,
            q.stride(0),
            q.stride(1),
            k.data_ptr(),
            k.stride(0),
            k.stride(1),
            v.data_ptr(),
            v.stride(0),
            v.stride(1),
            hkv,
            lk,
            d,
            int(causal),
            d**-0.5,
            out.data_ptr(),
            lse.data_ptr(),
        )
    return out, lse
