"""Timing pieces of work: the median of repeated runs, after a warm-up run."""

from __future__ import annotations

import statistics
import time
from typing import Callable, TypeVar

import torch

K = TypeVar("K")


def median_time(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Median wall seconds of `fn()` over `repeats` calls, after one warm-up call; on a GPU, each
    timed call ends when its kernels have finished."""
    return median_times({None: fn}, repeats, device)[None]


def median_times(
    fns: dict[K, Callable[[], object]],
    repeats: int,
    device: torch.device | str = "cpu",
    progress=None,
    before: Callable[[], object] | None = None,
) -> dict[K, float]:
    """`median_time` of each of `fns`, in `repeats` passes that call every one in turn (after a warm-up
    call each): a slow spell of a shared machine then costs each piece of work one sample of its
    median, not every sample of the pieces timed during it. `progress(n)` is told of every n calls;
    `before()`, where given, runs untimed before every timed call."""
    on_gpu = torch.device(device).type == "cuda"

    def timed(fn) -> float:
        if on_gpu:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if before is not None:
                before()
            times[key].append(timed(fn))
            if progress is not None:
                progress(1)
    return {key: statistics.median(samples) for key, samples in times.items()}
