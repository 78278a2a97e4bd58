"""What a real `Engine` needs to step without a model: a runner that holds only shapes, and an executor
that, instead of running a plan on ranks, advances the virtual clock by the plan's step time and
returns a token for every chunk that samples. Everything that decides (admission, chunk sizes,
priorities, preemption, the pipeline's in-flight micro-batches, `num_computed`) stays the engine's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.executor import Sampled
from mnemosyne_hpc.engine.plan import StepPlan
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.sim.clock import VirtualClock


@dataclass(frozen=True)
class StageCount:
    num_stages: int


@dataclass
class VirtualRunner:
    """The parts of a `ModelRunner` the engine reads on rank 0: model shape, KVP geometry, KV blocks per
    group, and (as `ctx.num_stages`) the pipeline depth."""

    args: ModelArgs
    layout: KVPLayout
    num_blocks: int
    ctx: StageCount


class SimulatedExecutor:
    """`run(plan)` takes `step_time(plan, idle_s)` seconds of the virtual clock, `idle_s` the time since the
    last step ended (unbounded before the first). Every sampled token is `token`, which is neither an
    end-of-sequence nor a stop token, so requests end by their length, as in a benchmark run with
    `ignore_eos`."""

    def __init__(self, clock: VirtualClock, step_time: Callable[[StepPlan, float], float], token: int):
        self.clock, self.step_time, self.token = clock, step_time, token
        self.last_end = -math.inf

    def run(self, plan: StepPlan) -> dict[int, Sampled]:
        self.clock.advance(self.step_time(plan, self.clock.now - self.last_end))
        self.last_end = self.clock.now
        return {c.request_id: Sampled(self.token) for c in plan.sampled}

    def keep_alive(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
