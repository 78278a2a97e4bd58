"""Builds a kernel's C source for this CPU on first use and loads it with ctypes.

A library is built with the system C compiler (`$CC`, else `cc`) into `$MNEMOSYNE_CACHE/kernels`
(default `~/.cache/mnemosyne_hpc/kernels`), named by a hash of the source, the headers beside it,
the flags and the CPU. Its OpenMP runtime is the one torch already loaded, so kernels share torch's
thread count. Without a compiler, or if the build fails, `build` warns and returns None, and callers
use torch's ops: the same math, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
# WITH_AMX tells a kernel with and without an AMX path which to build (-march=native alone may enable
# AMX instructions in a build whose process was never granted AMX state).
AMX_FLAGS = ("-mamx-tile", "-mamx-bf16", "-mavx512bf16", "-DWITH_AMX")


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        return tuple(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("model name", "flags"))
        )
    except OSError:
        return ()


def cpu_flags() -> set[str]:
    return next((set(line.split(":", 1)[1].split()) for line in _cpuinfo_lines() if line.startswith("flags")), set())


def cpu_model() -> str:
    return next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
        platform.machine(),
    )


def build(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    flags = [*FLAGS, *extra_flags]
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        print(f"warning: no C compiler ({compiler}); torch's kernels stand in for {source.name}", file=sys.stderr)
        return None
    headers = [header.read_text() for header in sorted(source.parent.glob("*.h"))]  # included by the sources
    key = hashlib.sha256("\n".join([source.read_text(), *headers, compiler, *flags, *_cpuinfo_lines()]).encode())
    key = key.hexdigest()[:16]
    cache = Path(os.environ.get("MNEMOSYNE_CACHE", "~/.cache/mnemosyne_hpc")).expanduser() / "kernels"
    path = cache / f"{source.stem}-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # ranks may build at once: rename is atomic
            built = Path(tmp) / path.name
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built), "-lm"], capture_output=True, text=True
            )
            if result.returncode != 0:
                print(
                    f"warning: building {source.name} failed; torch's kernels stand in for it:\n"
                    f"{result.stderr[-2000:]}",
                    file=sys.stderr,
                )
                return None
            os.replace(built, path)
    return ctypes.CDLL(str(path))


def load(
    source: Path, functions: dict[str, list], flags: tuple[str, ...] = (), amx: bool = False
) -> ctypes.CDLL | None:
    """`build`s `source` and declares its `functions` (name → argument types; none returns a value).
    With `amx`, for a kernel that uses AMX bf16 tiles (it includes amx.h): None on CPUs without them,
    or where the process is refused AMX state."""
    if amx and not {"amx_tile", "amx_bf16"} <= cpu_flags():
        return None
    library = build(source, (*flags, *AMX_FLAGS) if amx else flags)
    if library is None:
        return None
    if amx and not library.amx_init():
        print(f"warning: {source.name} was refused AMX state; its AMX build is not used", file=sys.stderr)
        return None
    for name, argtypes in functions.items():
        function = getattr(library, name)
        function.restype, function.argtypes = None, argtypes
    return library
