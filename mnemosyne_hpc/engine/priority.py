"""Which request goes first: FCFS, EDF, or length-aware relative slack (LARS).

A request's prefill deadline is `arrival + max(m × predicted prefill time of its prompt, d_min)`, the
prompt's tokens found in the prefix cache on arrival left out;
its slack is `deadline − now − predicted remaining prefill time`. LARS orders by slack relative to
the deadline span, so a short request overtakes a long prefill until the long one's slack runs out.
The smallest key goes first; the largest key is the first to be preempted.
"""

from __future__ import annotations

from mnemosyne_hpc.config import SchedulerConfig
from mnemosyne_hpc.engine.request import Request
from mnemosyne_hpc.perf.model import PerfModel


class Priority:
    def __init__(self, cfg: SchedulerConfig, perf_model: PerfModel | None):
        self.cfg, self.perf_model = cfg, perf_model

    def deadline(self, request: Request) -> float:
        prefill = self.perf_model.prefill_time(len(request.prompt_token_ids)) - self.perf_model.prefill_time(
            request.cached_at_arrival
        )
        span = self.cfg.deadline_multiplier * prefill
        return request.arrival + max(span, self.cfg.min_deadline_ms / 1000)

    def slack(self, request: Request, now: float) -> float:
        remaining = self.perf_model.prefill_time(request.prefill_len) - self.perf_model.prefill_time(
            min(request.num_scheduled, request.prefill_len)
        )
        return self.deadline(request) - now - remaining

    def key(self, request: Request, now: float) -> tuple:
        if self.cfg.priority == "fcfs":
            return (request.arrival, request.id)
        if self.cfg.priority == "edf":
            return (self.deadline(request), request.id)
        return (self.slack(request, now) / (self.deadline(request) - request.arrival), request.id)

    def order(self, requests: list[Request], now: float) -> list[Request]:
        return sorted(requests, key=lambda r: self.key(r, now))
