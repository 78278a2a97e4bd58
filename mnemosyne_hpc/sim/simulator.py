"""The discrete-event loop: requests arrive on the virtual clock, a real `Engine` (scheduler, priorities,
KV placement, pipeline) steps over them, and each step advances the clock by its time. The clock jumps
over idle gaps to the next arrival. The result holds the same per-request records and aggregates as a
real run (`engine/metrics.py`) and the chunks every step fed to the pipeline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from mnemosyne_hpc.auto_config import model_len
from mnemosyne_hpc.config import Config
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.engine.metrics import request_record, summarize
from mnemosyne_hpc.engine.plan import StepPlan
from mnemosyne_hpc.engine.request import SamplingParams
from mnemosyne_hpc.engine.runner import kv_pool_blocks
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.perf.model import PerfModel
from mnemosyne_hpc.sim.clock import VirtualClock
from mnemosyne_hpc.sim.executor import SimulatedExecutor, StageCount, VirtualRunner
from mnemosyne_hpc.sim.step_time import PipelineTicks


@dataclass(frozen=True)
class Arrival:
    """One request of a stream: when it arrives, its prompt length, and the tokens it generates."""

    time: float
    prompt_tokens: int
    max_tokens: int


@dataclass
class SimResult:
    records: list[dict]  # one per request, in the stream's order (engine/metrics.py request_record)
    summary: dict  # engine/metrics.py summarize
    # per step, the chunks that entered the pipeline: (request's index in the stream, start position, tokens)
    steps: list[list[tuple[int, int, int]]] = field(default_factory=list)

    def chunks_of(self, index: int) -> list[int]:
        """Sizes of the chunks (prefill chunks and decode tokens) request `index` ran, in order."""
        return [n for step in self.steps for i, _, n in step if i == index]


def pool_blocks(cfg: Config, args: ModelArgs) -> int:
    """KV blocks per rank as the engine sizes its pool: cache.num_blocks, or what cache.kv_memory_gib holds
    in model.dtype."""
    if cfg.cache.num_blocks:
        return cfg.cache.num_blocks
    if cfg.model.dtype == "auto":
        raise ValueError(
            "the simulated KV pool needs cache.num_blocks, or model.dtype (float32, bfloat16 or float16) "
            "to size cache.kv_memory_gib in: model.dtype=auto is the checkpoint's, and a simulation has none"
        )
    return kv_pool_blocks(cfg.cache, args, cfg.parallel.tp, cfg.parallel.spp, getattr(torch, cfg.model.dtype))


class Simulator:
    """One simulated deployment: `cfg` (parallel layout, cache, scheduler), a model shape, the performance
    model the scheduler decides with, and the step times (by default that model's pipeline ticks); the KV
    pool holds `num_blocks` blocks per rank, or as many as the engine would (`pool_blocks`)."""

    def __init__(
        self,
        cfg: Config,
        args: ModelArgs,
        perf_model: PerfModel | None,
        num_blocks: int | None = None,
        step_time: Callable[[StepPlan, float], float] | None = None,
        start: float = 0.0,
    ):
        # A stream gives prompt lengths, not their tokens: every simulated prompt is the same token
        # repeated, which a prefix cache would take for one shared prefix.
        # cache.max_model_len = 0 is the model's window, as a real run settles it (`auto_config.py`).
        num_blocks = num_blocks or pool_blocks(cfg, args)
        max_model_len = cfg.cache.max_model_len or model_len(cfg, args, num_blocks)[0]
        cfg = dataclasses.replace(
            cfg, cache=dataclasses.replace(cfg.cache, prefix_caching=False, max_model_len=max_model_len)
        )
        self.cfg, self.clock = cfg, VirtualClock(start)
        layout = KVPLayout.of(cfg)
        runner = VirtualRunner(args, layout, num_blocks, StageCount(cfg.parallel.spp))
        self.token = next(t for t in range(args.vocab_size) if t not in args.eos_token_ids)
        executor = SimulatedExecutor(self.clock, step_time or PipelineTicks(perf_model, layout), self.token)
        self.engine = Engine(cfg, runner, perf_model=perf_model, clock=self.clock, executor=executor)

    def run(self, arrivals: list[Arrival]) -> SimResult:
        engine, clock = self.engine, self.clock
        pending = sorted(enumerate(arrivals), key=lambda item: item[1].time)[::-1]  # next arrival last
        index_of, finished, steps = {}, [], []
        while pending or engine.has_unfinished:
            while pending and pending[-1][1].time <= clock.now:
                index, arrival = pending.pop()
                params = SamplingParams(max_tokens=arrival.max_tokens, ignore_eos=True)
                index_of[engine.enqueue([self.token] * arrival.prompt_tokens, params, arrival.time)] = index
            if not engine.has_unfinished:
                clock.now = pending[-1][1].time
                continue
            finished += engine.step().finished
            steps.append([(index_of[c.request_id], c.start_pos, len(c.token_ids)) for c in engine.last_plan.entering])
        start = min((a.time for a in arrivals), default=0.0)
        records = [request_record(r, start) for r in sorted(finished, key=lambda r: index_of[r.id])]
        return SimResult(records, summarize(records, self.cfg.scheduler.tbt_slo_ms / 1000), steps)
