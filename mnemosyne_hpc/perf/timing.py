"""Timing one piece of work: the median of repeated runs, after a warm-up run."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Median wall seconds of `fn()` over `repeats` calls, after one warm-up call; on a GPU, each
    timed call ends when its kernels have finished."""
    on_gpu = torch.device(device).type == "cuda"

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
