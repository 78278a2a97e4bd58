"""Builds a kernel's C source for this CPU on first use and loads it with ctypes.

A library is built with the system C compiler (`$CC`, else `cc`) into `$MNEMOSYNE_CACHE/kernels`
(default `~/.cache/mnemosyne_hpc/kernels`), named by a hash of the source, the flags and the CPU.
Its OpenMP runtime is the one torch already loaded, so kernels share torch's thread count. Without
a compiler, or if the build fails, `build` warns and returns None, and callers use torch's kernels:
the same attention, only slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_signature() -> str:
    try:
        return "".join(line for line in Path("/proc/cpuinfo").read_text().splitlines(keepends=True)
                       if line.startswith(("model name", "flags")))
    except OSError:
        return ""


def build(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    flags = [*FLAGS, *extra_flags]
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        print(f"warning: no C compiler ({compiler}); {source.stem} attention uses torch's flash kernel", file=sys.stderr)
        return None
    key = hashlib.sha256("\n".join([source.read_text(), compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MNEMOSYNE_CACHE", "~/.cache/mnemosyne_hpc")).expanduser() / "kernels"
    path = cache / f"{source.stem}-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # ranks may build at once: rename is atomic
            built = Path(tmp) / path.name
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                print(f"warning: building {source.name} failed; {source.stem} attention uses torch's flash kernel:\n"
                      f"{result.stderr[-2000:]}", file=sys.stderr)
                return None
            os.replace(built, path)
    return ctypes.CDLL(str(path))
