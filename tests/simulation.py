"""A scheduler on a fake clock: each step takes the time a performance model predicts for it, so
scheduling runs are deterministic and independent of this machine's speed."""

from __future__ import annotations

from mnemosyne_hpc.config import SchedulerConfig
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.kv_cache import KVPlacement
from mnemosyne_hpc.engine.request import Request, SamplingParams
from mnemosyne_hpc.engine.scheduler import Scheduler
from mnemosyne_hpc.perf.model import AttentionFit, Curve, PerfModel, SequenceShape

# 1 ms per step, 2 µs per token of linear layers, attention 10 ns per query token per cached token
SYNTHETIC = PerfModel(
    key="synthetic",
    layers=1,
    stages=1,
    linear=Curve([0, 1000], [0.0, 2e-3]),
    attention=AttentionFit.linear([1, 1000], [0.0, 0.0], [1e-8, 1e-5]),
    lm_head=Curve([1], [0.0]),
    overhead_s=1e-3,
)


class Simulation:
    """A scheduler and an instant model: each step takes its predicted time on the fake clock."""

    def __init__(self, perf_model=SYNTHETIC, num_blocks=4096, block_size=16, **scheduler):
        self.now = 0.0
        self.cfg = SchedulerConfig(**{"max_num_batched_tokens": 100_000, "slo_headroom": 0.0, **scheduler})
        self.perf_model = perf_model
        self.placement = KVPlacement(KVPLayout(1, group_tokens=num_blocks * block_size), num_blocks, block_size)
        self.scheduler = Scheduler(self.cfg, self.placement, perf_model=perf_model, clock=lambda: self.now)
        self.steps: list[dict] = []  # request id → (start, length) of its chunk, per step
        self.finished: list[Request] = []
        self._ids = 0

    def add(self, prompt_len: int, max_tokens: int = 4, arrival: float | None = None) -> Request:
        request = Request(
            id=self._ids,
            prompt_token_ids=[1] * prompt_len,
            sampling=SamplingParams(max_tokens=max_tokens),
            max_len=prompt_len + max_tokens,
            arrival=self.now if arrival is None else arrival,
        )
        self._ids += 1
        self.scheduler.add(request)
        return request

    def step(self) -> None:
        chunks = self.scheduler.schedule()
        self.scheduler.take_changes()
        self.steps.append({c.request_id: (c.start_pos, len(c.token_ids)) for c in chunks})
        shapes = [SequenceShape(len(c.token_ids), c.start_pos) for c in chunks]
        self.now += self.perf_model.batch_time(shapes, sum(c.sampling is not None for c in chunks)) if shapes else 1e-3
        running = {r.id: r for r in self.scheduler.running}
        for chunk in chunks:
            request = running[chunk.request_id]
            request.num_computed += len(chunk.token_ids)
            if chunk.sampling is not None:
                request.output_token_ids.append(chunk.sample_position)  # a token that depends on its position
                request.token_times.append(self.now)
                if request.num_tokens >= request.max_len:
                    request.finish_time = self.now
                    self.scheduler.finish(request)
                    self.finished.append(request)

    def run_until(self, condition, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if condition():
                return
            self.step()
        raise AssertionError("the simulation did not reach its goal")

    def chunks_of(self, request: Request) -> list[int]:
        return [step[request.id][1] for step in self.steps if request.id in step]
