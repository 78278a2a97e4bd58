"""Calibrate the performance model on this hardware and this parallel layout, and measure its error.

    python -m mnemosyne_hpc.profile [overrides]                  # one rank
    launch/mpirun.sh -n 2 python -m mnemosyne_hpc.profile parallel.tp=2

1. Every rank times its real kernels, with its own shard shapes: one layer's linear part against
   batch tokens, attention against query tokens × cached tokens, the LM head and sampling against
   sampled rows, and the layout's collectives (KVP merge, SPP hand-over).
2. Rank 0 fits the terms of `PerfModel` and then times whole engine steps (plan broadcast and
   every rank executing it) on random batch shapes: one set fits the per-step overhead, a
   held-out set measures the prediction error, which is printed and stored with the profile.

The profile is stored under `<model.cache_dir>/profiles/<key>.json` (or `scheduler.profile`), keyed
by model shape, dtype, hardware and layout; the engine loads it, or takes one at start-up.
"""
from __future__ import annotations

import itertools
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mnemosyne_hpc.config import Config, compose_command_line, kvp_group_tokens, resolve_cache_dir
from mnemosyne_hpc.distributed.mesh import stage_layers
from mnemosyne_hpc.engine.engine import broadcast_plan, follow
from mnemosyne_hpc.engine.perf_model import (FITTED_TERMS, AttentionFit, Curve, PerfModel, SequenceShape,
                                             hardware_name, profile_key)
from mnemosyne_hpc.engine.plan import Chunk, StepPlan
from mnemosyne_hpc.engine.request import SamplingParams
from mnemosyne_hpc.engine.runner import ModelRunner
from mnemosyne_hpc.engine.sampler import sample
from mnemosyne_hpc.model.attention import attention, chunk_attention, merge_over_group

GREEDY = SamplingParams(seed=0)


def profile_path(cfg: Config, runner: ModelRunner) -> Path:
    if cfg.scheduler.profile:
        return Path(cfg.scheduler.profile).expanduser()
    layout = {"tp": cfg.parallel.tp, "spp": cfg.parallel.spp, "kvp": cfg.parallel.kvp}
    key = profile_key(runner.args, cfg.model.dtype, hardware_name(runner.ctx.device), layout)
    return resolve_cache_dir(cfg) / "profiles" / f"{key}.json"


def load_or_profile(cfg: Config, runner: ModelRunner, force: bool = False) -> PerfModel | None:
    """On every rank: rank 0 gets the stored profile, or all ranks take one now (rank 0 gets it).
    `force` (the profile command) always takes a new, full one."""
    path = profile_path(cfg, runner)
    decision = [path.exists() and not force]
    dist.broadcast_object_list(decision, src=0, group=runner.ctx.cpu_group)
    if decision[0]:
        return PerfModel.load(path) if runner.ctx.rank == 0 else None
    if runner.ctx.rank == 0:
        print(f"profiling this hardware for the performance model (stored in {path})", file=sys.stderr)
    model = Profiler(cfg, runner).run(quick=cfg.scheduler.profile_quick and not force)
    if model is not None:
        model.key = path.stem
        model.save(path)
    return model


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `reps` runs after one warm-up run."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Profiler:
    def __init__(self, cfg: Config, runner: ModelRunner):
        self.cfg, self.runner, self.ctx = cfg, runner, runner.ctx
        self.layer = next(iter(runner.model.layers.values()))
        self.device, self.dtype = self.ctx.device, runner.dtype
        self.group_tokens = kvp_group_tokens(cfg)
        self.capacity = runner.num_blocks * cfg.cache.block_size  # slots in this rank's KV pool
        self.max_tokens = min(cfg.scheduler.max_num_batched_tokens, self.capacity // 2)
        self.max_context = min(self.group_tokens, self.capacity - self.max_tokens)

    @torch.inference_mode()
    def run(self, quick: bool) -> PerfModel | None:
        self.reps = 3 if quick else 5
        used = slice(0, self.max_context + self.max_tokens)
        self.runner.kv_cache.k[:, :, used].normal_()  # finite values: timing must not meet NaN paths
        self.runner.kv_cache.v[:, :, used].normal_()
        measured = self._components(quick)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measured, group=self.ctx.cpu_group)
        if self.ctx.rank != 0:
            follow(self.runner)  # rank 0 now times whole steps
            return None
        model = self._fit_components(gathered)
        slowest = 0.25 if quick else 2.0  # seconds of kernel time a random step may take
        calibration, held_out = (self._shapes(model, seed, count, slowest)
                                 for seed, count in ((1, 16 if quick else 40), (2, 8 if quick else 24)))
        steps = [(shape, self._time_step(shape)) for shape in tqdm(calibration + held_out, desc="whole steps",
                                                                   file=sys.stderr, leave=False)]
        broadcast_plan(StepPlan(shutdown=True), self.ctx.cpu_group)
        self._fit_overhead(model, steps[: len(calibration)])
        errors = [abs(self._predict(model, shape) - seconds) / seconds for shape, seconds in steps[len(calibration):]]
        model.report = {
            "hardware": hardware_name(self.device), "dtype": self.cfg.model.dtype, "quick": quick,
            "layout": {"tp": self.cfg.parallel.tp, "spp": self.cfg.parallel.spp, "kvp": self.cfg.parallel.kvp},
            "held_out_steps": len(errors), "median_abs_error": statistics.median(errors),
            "p90_abs_error": float(np.percentile(errors, 90)), "max_abs_error": max(errors),
            "held_out": [{"sequences": [list(seq) for seq in shape], "measured_s": seconds,
                          "predicted_s": self._predict(model, shape)} for shape, seconds in steps[len(calibration):]],
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(f"performance model: median |error| {model.report['median_abs_error']:.1%}, p90 "
              f"{model.report['p90_abs_error']:.1%}, max {model.report['max_abs_error']:.1%} "
              f"over {len(errors)} held-out batch shapes", file=sys.stderr)
        return model

    # --- 1. kernels on every rank ----------------------------------------------------------------
    def _grids(self, quick: bool):
        tokens = [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if t <= self.max_tokens]
        queries = [q for q in (1, 8, 32, 128, 512, 2048, 8192) if q <= self.max_tokens]
        contexts = [n for n in (0, 256, 1024, 4096, 16384, 65536, 262144) if n <= self.max_context]
        if quick:
            tokens, queries = tokens[::2] + tokens[-1:], queries[::2] + queries[-1:]
        return sorted(set(tokens)), sorted(set(queries)), contexts

    def _components(self, quick: bool) -> dict:
        tokens, queries, contexts = self._grids(quick)
        attn, d = self.layer.self_attn, self.runner.args.head_dim
        flop_cap = 2e10 if quick else 1e11  # skip attention points slower than about a second
        measured = {"linear": {}, "attention": {}, "lm_head": {}, "merge": {}, "hand_over": {}}
        points = [("linear", t) for t in tokens] + [("attention", (q, n)) for q in queries for i, n in enumerate(contexts)
                                                    if i < 2 or 4 * q * n * attn.num_heads * d <= flop_cap]
        points += [("lm_head", r) for r in tokens if r <= self.cfg.scheduler.max_num_seqs] if self.ctx.last_stage else []
        points += [("merge", t) for t in tokens] if self.ctx.kvp_size > 1 else []
        points += [("hand_over", t) for t in tokens] if self.ctx.num_stages > 1 else []
        for kind, point in tqdm(points, desc="kernels", file=sys.stderr, leave=False, disable=self.ctx.rank != 0):
            fn = getattr(self, f"_{kind}")(point)
            measured[kind][point] = timed(fn, self.reps, self.device)
        return measured

    def _attention(self, point: tuple[int, int]):
        """Each call reads its prefix from another part of the KV pool, as a step reads KV that no
        cache holds: timing one prefix again and again would find it in the CPU's caches."""
        (q, n), attn, d, kv = point, self.layer.self_attn, self.runner.args.head_dim, self.runner.kv_cache
        query = torch.randn(attn.num_heads, q, d, dtype=self.dtype, device=self.device)
        key = torch.randn(attn.num_kv_heads, q, d, dtype=self.dtype, device=self.device)
        used, span = self.max_context + self.max_tokens, n + (q == 1)
        starts = itertools.cycle(range(0, used - span + 1, max(span, used // 64)) if span else [0])
        layers = itertools.cycle(range(kv.k.shape[0]))

        def fn():  # as the model runs it: a single token reads its own K/V from the cache with the rest
            layer, start = next(layers), next(starts)
            cached = slice(start, start + span)
            if q == 1:
                return attention(query, kv.k[layer][:, cached], kv.v[layer][:, cached], causal=False)
            return chunk_attention(query, key, key, *((kv.k[layer][:, cached], kv.v[layer][:, cached]) if n
                                                      else (None, None)))
        return fn

    def _hidden(self, tokens: int) -> torch.Tensor:
        return torch.randn(tokens, self.runner.args.hidden_size, dtype=self.dtype, device=self.device)

    def _linear(self, tokens: int):
        layer, attn, d = self.layer, self.layer.self_attn, self.runner.args.head_dim
        x = self._hidden(tokens)
        angles = torch.randn(tokens, d, dtype=self.dtype, device=self.device)
        attended = torch.randn(tokens, attn.num_heads * d, dtype=self.dtype, device=self.device)

        def fn():  # the layer without its attention kernel
            attn.project(layer.input_layernorm(x), angles, angles)
            return layer.feed_forward(attn.o_proj(attended), x)
        return fn

    def _lm_head(self, rows: int):
        hidden, positions = self._hidden(rows), list(range(rows))
        return lambda: sample(self.runner.model.logits(hidden), [GREEDY] * rows, positions)

    def _merge(self, rows: int):
        heads, d = self.layer.self_attn.num_heads, self.runner.args.head_dim
        out = torch.randn(heads, rows, d, dtype=self.dtype, device=self.device)
        lse = torch.randn(heads, rows, dtype=torch.float32, device=self.device)
        group = self.ctx.kvp_groups[0, self.ctx.kvp_size - 1]
        return lambda: merge_over_group(out, lse, group)

    def _hand_over(self, tokens: int):
        x, received = self._hidden(tokens), self._hidden(tokens)

        def fn():
            send = dist.isend(x, dst=self.ctx.next_rank) if self.ctx.next_rank is not None else None
            if self.ctx.prev_rank is not None:
                dist.recv(received, src=self.ctx.prev_rank)
            if send is not None:
                send.wait()
        return fn

    # --- 2. fit, then whole steps driven by rank 0 -----------------------------------------------
    def _fit_components(self, gathered: list[dict]) -> PerfModel:
        def worst(kind):  # the slowest rank sets the pace of a lock-step iteration
            points = {}
            for measured in gathered:
                for point, seconds in measured[kind].items():
                    points[point] = max(points.get(point, 0.0), seconds)
            return points

        def curve(points):
            return Curve(*map(list, zip(*sorted(points.items())))) if points else None

        attention = worst("attention")
        queries = sorted({q for q, _ in attention})
        intercepts, slopes = [], []
        for q in queries:
            n, seconds = zip(*sorted((n, s) for (q2, n), s in attention.items() if q2 == q))
            slope, intercept = np.polyfit(n, seconds, 1)
            intercepts.append(float(intercept))
            slopes.append(float(max(slope, 0.0)))
        return PerfModel(key="", layers=len(stage_layers(self.runner.args.num_layers, self.ctx.num_stages, 0)),
                         stages=self.ctx.num_stages, linear=curve(worst("linear")),
                         attention=AttentionFit(Curve(queries, intercepts), Curve(queries, slopes)),
                         lm_head=curve(worst("lm_head")), merge=curve(worst("merge")),
                         hand_over=curve(worst("hand_over")))

    def _shapes(self, model: PerfModel, seed: int, count: int, slowest: float) -> list[list[tuple[int, int, bool]]]:
        """Random batches of (query tokens, cached tokens, sampled), each predicted to take at most
        `slowest` seconds: up to 32 decodes and up to two prefill chunks, sizes and contexts log-uniform
        so that small steps are as common as big ones."""
        rng = random.Random(seed)

        def log_uniform(low: int, high: int) -> int:
            return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))

        seqs, shapes, attempts = self.cfg.scheduler.max_num_seqs, [], 0
        while len(shapes) < count:
            decodes = [(1, log_uniform(1, self.max_context), True) for _ in range(rng.randint(0, min(seqs, 32)))]
            room = self.max_tokens - len(decodes)
            chunks = []
            for _ in range(rng.randint(0 if decodes else 1, min(2, seqs - len(decodes)))):
                if room < 1:
                    break
                q = log_uniform(1, min(room, 2048))
                # a prompt's last chunk samples, the others do not
                chunks.append((q, rng.choice([0, log_uniform(1, self.max_context)]), rng.random() < 0.5))
                room -= q
            shape = decodes + chunks
            attempts += 1
            if shape and (self._predict(model, shape) <= slowest or attempts > 1000):  # a slow model: take any
                shapes.append(shape)
        return shapes

    def _groups(self, shape) -> list[tuple[list[SequenceShape], int]]:
        """Per KVP group: its sequences and sampled rows (sequence i runs on group i mod K)."""
        mine = [[seq for i, seq in enumerate(shape) if i % self.ctx.kvp_size == g] for g in range(self.ctx.kvp_size)]
        return [([SequenceShape(q, n) for q, n, _ in seqs], sum(sampled for *_, sampled in seqs)) for seqs in mine]

    def _predict(self, model: PerfModel, shape) -> float:
        return max(model.batch_time(seqs, sampled) for seqs, sampled in self._groups(shape))

    def _time_step(self, shape) -> float:
        """Rank 0's seconds per pipeline tick with this micro-batch in every stage (median of reps)."""
        table = list(range(self.runner.num_blocks))
        chunks = [Chunk(request_id=i, token_ids=[1] * q, start_pos=n, first_group=i % self.ctx.kvp_size,
                        num_groups=1, sampling=GREEDY if sampled else None) for i, (q, n, sampled) in enumerate(shape)]
        tables = {i: (i % self.ctx.kvp_size, [table]) for i in range(len(shape))}
        stages = self.ctx.num_stages
        ticks = []
        for tick in range(2 * (stages - 1) + self.reps + 1):  # fill, measure, drain
            plan = StepPlan(stages=[chunks if 0 <= tick - s < stages - 1 + self.reps + 1 else []
                                    for s in range(stages)], block_tables=tables if tick == 0 else {})
            start = time.perf_counter()
            broadcast_plan(plan, self.ctx.cpu_group)
            self.runner.execute(plan)
            ticks.append(time.perf_counter() - start)
        return statistics.median(ticks[stages: stages + self.reps])

    def _fit_overhead(self, model: PerfModel, steps) -> None:
        """Whole step ≈ overhead + per_sequence × sequences + collectives + Σ weight × measured term, by
        non-negative least squares on the relative error (short steps count as much as long ones)."""
        features, targets = [], []
        for shape, seconds in steps:
            seqs, sampled = max(self._groups(shape), key=lambda group: model.batch_time(*group))
            terms = model.terms(seqs, sampled)
            features.append([1.0, len(seqs)] + [terms[name] for name in FITTED_TERMS])
            targets.append((seconds - terms["collectives"]) / seconds)
        features = np.array(features) / np.array([seconds for _, seconds in steps])[:, None]
        overhead, per_sequence, *weights = nonnegative_least_squares(features, np.array(targets))
        model.overhead_s, model.per_sequence_s = overhead, per_sequence
        model.weights = dict(zip(FITTED_TERMS, weights))


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> list[float]:
    """min |a x − b| with x >= 0: least squares, dropping the most negative unknown until none is."""
    free = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        x[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        if x.min() >= 0:
            return [float(v) for v in x]
        free.remove(int(np.argmin(x)))


def main(argv: list[str] | None = None) -> None:
    from mnemosyne_hpc.runtime import run

    cfg = compose_command_line(argv)

    def report(model: PerfModel) -> None:
        r = model.report
        print(f"profile {model.key}: {r['hardware']}, {r['dtype']}, layout {r['layout']}; held-out median "
              f"|error| {r['median_abs_error']:.1%} (p90 {r['p90_abs_error']:.1%}) over {r['held_out_steps']} shapes")

    run(cfg, lambda engine: report(engine.perf_model), force_profile=True)


if __name__ == "__main__":
    main()
