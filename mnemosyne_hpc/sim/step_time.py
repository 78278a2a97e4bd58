"""How long one engine step takes in the simulator.

`PipelineTicks` predicts it: a step is one lock-step pipeline tick (DESIGN.md 2.1), every stage runs
its micro-batch at the same time, so the tick lasts as long as the slowest stage; within a stage each
KVP group runs the chunks that read its KV shard at the same time as the others, so a stage lasts as
long as its slowest group. The per-group time, TP collectives and KVP merge included, is the
performance model's `batch_time` of that group's part of the micro-batch, composed by the same
`chunk_shapes` the scheduler predicts with, and a tick that starts after the engine sat idle takes the
model's `wake` times as long. `RecordedSteps` replays a real run's measured durations.
"""

from __future__ import annotations

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.plan import MicroBatch, StepPlan
from mnemosyne_hpc.engine.scheduler import GroupLoad, chunk_shapes
from mnemosyne_hpc.perf.model import PerfModel

# A tick with nothing to run (every request waits for a KV block or a token in flight) still costs a
# plan broadcast on a real engine; on the virtual clock it must take some time, or nothing would change.
EMPTY_TICK_S = 1e-4


class PipelineTicks:
    def __init__(self, perf_model: PerfModel, layout: KVPLayout):
        self.perf_model, self.layout = perf_model, layout
        self._times: dict[tuple[int, bool], tuple[MicroBatch, float]] = {}  # the last tick's stages, by identity

    def __call__(self, plan: StepPlan, idle_s: float = 0.0) -> float:
        """The tick of `plan`, `idle_s` after the one before it ended. A micro-batch moves one stage on per
        tick, the same list object: its time is computed once for the stages before the last (which alone
        samples), not once per stage."""
        last, times = len(plan.stages) - 1, {}
        for s, batch in enumerate(plan.stages):
            key = (id(batch), s == last)
            known = self._times.get(key)
            if known is None or known[0] is not batch:
                known = batch, self.stage_time(batch, s == last)
            times[key] = known
        self._times = times
        return self.perf_model.after_idle(max(t for _, t in times.values()) or EMPTY_TICK_S, idle_s)

    def stage_time(self, batch: MicroBatch, samples: bool) -> float:
        """Seconds a stage needs for `batch`: its slowest KVP group. Only the last stage samples."""
        loads: dict[int, GroupLoad] = {}
        for c in batch:
            for g, shape, sampled, merged in chunk_shapes(
                self.layout, c.first_group, c.start_pos, len(c.token_ids), c.sampling is not None
            ):
                loads.setdefault(g, GroupLoad(tokens_left=0)).add(shape, sampled if samples else 0, merged)
        return max((load.time(self.perf_model) for load in loads.values()), default=0.0)


class RecordedSteps:
    """A real run's step durations in order (each from the start of one step to the start of the next,
    so the loop around the engine is included): a replay's clock reads what the run's clock read
    whenever the scheduler decides."""

    def __init__(self, durations: list[float]):
        self._durations = iter(durations)

    def __call__(self, plan: StepPlan, idle_s: float = 0.0) -> float:
        try:
            return next(self._durations)
        except StopIteration:
            raise RuntimeError("the simulation took more steps than the recorded run") from None
