"""Time that passes only when the simulator says so."""

from __future__ import annotations


class VirtualClock:
    """Called like `time.perf_counter`; the simulated executor advances it by each step's time."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
