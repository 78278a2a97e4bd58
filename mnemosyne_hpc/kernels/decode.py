"""Decode attention on CPU (`decode.c`), built for this CPU on first use (see `build.py`)."""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from mnemosyne_hpc.kernels import bf16_rows_on_cpu, profiled
from mnemosyne_hpc.kernels.build import build

SOURCE = Path(__file__).with_name("decode.c")
MAX_ROWS = 16  # query rows per KV head this kernel takes; longer queries go to the prefill kernel
MIN_KEYS_PER_SPLIT = 256
MAX_KEYS_PER_SPLIT = 8192  # a split's scores stay in L2 between its key and value passes
TASKS_PER_THREAD = 4


@functools.cache
def _library():
    library = build(SOURCE)
    if library is not None:
        library.decode_attention.restype = None
        library.decode_attention.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return library


def _applies(rows: int, d: int, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (rows <= MAX_ROWS and d in (64, 128) and bf16_rows_on_cpu(k, v) and k.stride() == v.stride()
            and _library() is not None)


def decode_attention_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                           lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sequence i's queries q[i] ([Hkv, rows, D]) attend, unmasked, to the `lengths[i]` keys and
    values of k, v ([Hkv, slots, D]) from slot `starts[i]` on (starts, lengths: int64 CPU tensors).
    Returns out [S, Hkv, rows, D] (q's dtype) and lse [S, Hkv, rows], or None where the kernel does
    not apply."""
    seqs, hkv, rows, d = q.shape
    if not (q.dtype == torch.bfloat16 and _applies(rows, d, k, v)) or int(lengths.min()) < 1:
        return None
    q = q.contiguous()
    out = torch.empty(seqs, hkv, rows, d, dtype=torch.float32)
    lse = torch.empty(seqs, hkv, rows, dtype=torch.float32)
    tasks = TASKS_PER_THREAD * torch.get_num_threads()
    keys_per_split = min(max(math.ceil(int(lengths.sum()) * hkv / tasks), MIN_KEYS_PER_SPLIT), MAX_KEYS_PER_SPLIT)
    with profiled("decode_attention"):
        _library().decode_attention(q.data_ptr(), seqs, hkv, rows, d, k.data_ptr(), v.data_ptr(), k.stride(0),
                                    k.stride(1), starts.data_ptr(), lengths.data_ptr(), d ** -0.5,
                                    keys_per_split, out.data_ptr(), lse.data_ptr())
    return out.to(q.dtype), lse


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One sequence: q [Hq, Lq, D] over all of k, v [Hkv, L, D] → out [Hq, Lq, D], lse [Hq, Lq]."""
    hq, lq, d = q.shape
    hkv = k.shape[0]
    result = decode_attention_batch(q.reshape(1, hkv, hq // hkv * lq, d), k, v, torch.zeros(1, dtype=torch.long),
                                    torch.tensor([k.shape[1]]))
    if result is None:
        return None
    out, lse = result
    return out.reshape(hq, lq, d), lse.reshape(hq, lq)
