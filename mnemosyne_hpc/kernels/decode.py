"""Decode attention on CPU (`decode.c`), compiled for this CPU on first use.

The library is built with the system C compiler (`$CC`, else `cc`) into
`$MNEMOSYNE_CACHE/kernels` (default `~/.cache/mnemosyne_hpc/kernels`), named by a hash of the source,
the flags and the CPU, and loaded with ctypes. Its OpenMP runtime is the one torch already loaded,
so both share torch's thread count. Without a compiler, `decode_attention` returns None and callers
use torch's flash kernel: the same attention, only slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 16  # query rows per KV head this kernel takes; longer queries go to the flash kernel
MIN_KEYS_PER_SPLIT = 256
MAX_KEYS_PER_SPLIT = 8192  # a split's scores stay in L2 between its key and value passes
TASKS_PER_THREAD = 4


def _cpu_signature() -> str:
    try:
        return "".join(line for line in Path("/proc/cpuinfo").read_text().splitlines(keepends=True)
                       if line.startswith(("model name", "flags")))
    except OSError:
        return ""


@functools.cache
def _library():
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        print(f"warning: no C compiler ({compiler}); decode attention uses torch's flash kernel", file=sys.stderr)
        return None
    source = SOURCE.read_text()
    key = hashlib.sha256("\n".join([source, compiler, *FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MNEMOSYNE_CACHE", "~/.cache/mnemosyne_hpc")).expanduser() / "kernels"
    path = cache / f"decode-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # ranks may build at once: rename is atomic
            built = Path(tmp) / path.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                print(f"warning: building {SOURCE.name} failed; decode attention uses torch's flash kernel:\n"
                      f"{result.stderr[-2000:]}", file=sys.stderr)
                return None
            os.replace(built, path)
    library = ctypes.CDLL(str(path))
    library.decode_attention.restype = None
    library.decode_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p]
    return library


def _applies(rows: int, d: int, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (rows <= MAX_ROWS and d in (64, 128) and k.dtype == v.dtype == torch.bfloat16 and k.device.type == "cpu"
            and k.stride() == v.stride() and k.stride(2) == 1 and _library() is not None)


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
    with torch.profiler.record_function("mnemosyne::decode_attention"):  # named in torch profiles
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
