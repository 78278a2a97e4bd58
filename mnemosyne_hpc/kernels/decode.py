"""Decode attention on CPU: `decode_attention.c`, compiled for this CPU on first use.

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

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 16  # query rows per KV head this kernel takes; longer queries go to the flash kernel
MIN_KEYS_PER_SPLIT = 256
MAX_KEYS_PER_SPLIT = 8192  # a split's scores stay in L2 between its key and value passes


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
    path = cache / f"decode_attention-{key}.so"
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
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return library


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Unmasked attention of bf16 q [Hq, Lq, D] over k, v [Hkv, L, D] (rows contiguous, as views of
    the KV cache) for a few query rows per KV head; None where this kernel does not apply."""
    hq, lq, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    rows = hq // hkv * lq
    if (rows > MAX_ROWS or n == 0 or d not in (64, 128) or not q.dtype == k.dtype == v.dtype == torch.bfloat16
            or k.stride() != v.stride() or k.stride(2) != 1 or _library() is None):
        return None
    queries = q.reshape(hkv, rows, d).contiguous()
    out = torch.empty(hkv, rows, d, dtype=torch.float32)
    lse = torch.empty(hkv, rows, dtype=torch.float32)
    splits = max(1, min(math.ceil(4 * torch.get_num_threads() / hkv), n // MIN_KEYS_PER_SPLIT),
                 math.ceil(n / MAX_KEYS_PER_SPLIT))
    _library().decode_attention(queries.data_ptr(), hkv, rows, d, k.data_ptr(), v.data_ptr(), k.stride(0),
                                k.stride(1), n, d ** -0.5, splits, out.data_ptr(), lse.data_ptr())
    return out.reshape(hq, lq, d).to(q.dtype), lse.reshape(hq, lq)
