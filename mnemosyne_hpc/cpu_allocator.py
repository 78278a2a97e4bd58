"""Keep freed activation memory in the process on CPU, as a GPU caching allocator does.

glibc serves every allocation above its mmap threshold (at most 32 MiB, and far less by default)
with a fresh mapping and unmaps it on free, so every step's activations page-fault back in,
zero-filled by the kernel: element-wise ops ran 2–4× below memory bandwidth. With the thresholds
raised, freed blocks go back to the heap and the next step reuses them.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30  # larger blocks (the KV pool) still get their own mapping
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # the largest value mallopt takes: never give the heap back


def retain_freed_memory() -> bool:
    """Raise glibc's thresholds; False where the C library is not glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
