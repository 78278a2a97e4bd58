"""Decode attention on CPU (`decode.c`), built for this CPU on first use (see `build.py`)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import F32, I64, INT, PTR, bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import load

SOURCE = Path(__file__).with_name("decode.c")
MAX_ROWS = 16  # query rows per KV head this kernel takes; longer queries go to the prefill kernel
MIN_KEYS_PER_SPLIT = 256
MAX_KEYS_PER_SPLIT = 8192  # a split's scores stay in L2 between its key and value passes
TASKS_PER_THREAD = 4


FUNCTIONS = {
    "decode_attention": [PTR, I64, PTR, INT, PTR, PTR, PTR, INT, INT, INT, PTR, PTR, I64, I64, F32, I64, PTR, PTR]
}


@functools.cache
def _library():
    # AMX tiles compute the scores where the CPU has them, AVX512-BF16 dot products elsewhere.
    return load(SOURCE, FUNCTIONS, amx=True) or load(SOURCE, FUNCTIONS)


def decode_attention_into(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_rows: torch.Tensor,
    first_run: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    total_keys: int,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> bool:
    """Sequence i's queries q[batch_rows[i]] ([Hkv, rows, D]; q is [T, Hkv, rows, D], its last three
    dimensions dense) attend, unmasked, to the keys and values of k, v ([Hkv, slots, D]) in the runs
    first_run[i] .. first_run[i + 1] − 1, run r being `lengths[r]` (≥ 1; `total_keys` in all) slots
    from `starts[r]` on; into out[batch_rows[i]] and lse[batch_rows[i]] (out: contiguous
    [T, Hkv, rows, D] in q's dtype, lse: contiguous [T, Hkv, rows] float32). batch_rows, first_run,
    starts, lengths: int64 CPU tensors. False, with nothing written, where the kernel does not apply."""
    _, hkv, rows, d = q.shape
    if not (
        rows <= MAX_ROWS
        and d in (64, 128)
        and bf16_rows_on_cpu(q, k, v, out)
        and k.stride() == v.stride()
        and q.stride()[1:] == (rows * d, d, 1)
        and out.is_contiguous()
        and lse.is_contiguous()
        and _library() is not None
    ):
        return False
    tasks = TASKS_PER_THREAD * torch.get_num_threads()
    keys_per_split = min(max(math.ceil(total_keys * hkv / tasks), MIN_KEYS_PER_SPLIT), MAX_KEYS_PER_SPLIT)
    with profiled("decode_attention"):
        _library().decode_attention(
            q.data_ptr(),
            q.stride(0),
            batch_rows.data_ptr(),
            len(batch_rows),
            first_run.data_ptr(),
            starts.data_ptr(),
            lengths.data_ptr(),
            hkv,
            rows,
            d,
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            k.stride(1),
            d**-0.5,
            keys_per_split,
            out.data_ptr(),
            lse.data_ptr(),
        )
    return True


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One sequence: q [Hq, Lq, D] over all of k, v [Hkv, L, D] → out [Hq, Lq, D], lse [Hq, Lq]."""
    hq, lq, d = q.shape
    hkv, keys = k.shape[:2]
    if keys == 0 or lq * hq // hkv > MAX_ROWS:
        return None
    out = q.new_empty(hq, lq, d)
    lse = torch.empty(hq, lq, dtype=torch.float32)
    zero = torch.zeros(1, dtype=torch.long)
    if not decode_attention_into(
        q.contiguous().view(1, hkv, hq // hkv * lq, d),
        k,
        v,
        zero,
        torch.tensor([0, 1]),
        zero,
        torch.tensor([keys]),
        keys,
        out.view(1, hkv, -1, d),
        lse,
    ):
        return None
    return out, lse
