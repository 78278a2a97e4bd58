"""Calibrates the performance model on this hardware and this parallel layout, and measures its error.

1. Every rank times the parts of its engine step (`StepProbes`), with its own shard shapes: one
   layer's linear part against batch tokens, attention against query tokens × cached tokens, the LM
   head and sampling against sampled rows, and the layout's collectives (KVP merge, SPP hand-over);
   every kernel once in turn, over several passes, so that a slow spell of the machine touches one
   sample of each median.
2. Rank 0 fits the terms of `PerfModel` and then times whole engine steps (plan broadcast and
   every rank executing it) on random batch shapes: one set fits the per-step overhead, a
   held-out set measures the prediction error, which is printed and stored with the profile. A few
   shapes run again in turn, back to back and each after a pause (the engine idle): the ratio is `wake`.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mnemosyne_hpc.config import Config
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.distributed.mesh import stage_layers
from mnemosyne_hpc.engine.executor import Executor
from mnemosyne_hpc.engine.plan import Chunk, StepPlan
from mnemosyne_hpc.engine.probes import GREEDY, StepProbes
from mnemosyne_hpc.engine.runner import ModelRunner
from mnemosyne_hpc.engine.scheduler import GroupLoad, chunk_shapes
from mnemosyne_hpc.model.backend import FEW_ROWS
from mnemosyne_hpc.perf.hardware import hardware_name, profile_path
from mnemosyne_hpc.perf.model import FITTED_TERMS, AttentionFit, Curve, PerfModel
from mnemosyne_hpc.perf.timing import median_time, median_times


def load_or_profile(cfg: Config, runner: ModelRunner) -> PerfModel | None:
    """On every rank, where the scheduler uses a performance model: rank 0 gets the stored profile,
    or all ranks take one now (`scheduler.profile_quick`: on a coarse grid) and rank 0 gets it."""
    if not cfg.scheduler.needs_perf_model:
        return None
    path = profile_path(cfg, runner.args, runner.ctx.device)
    stored = [path.exists()]
    dist.broadcast_object_list(stored, src=0, group=runner.ctx.cpu_group)
    if stored[0]:
        return PerfModel.load(path) if runner.ctx.rank == 0 else None
    return calibrate(cfg, runner, quick=cfg.scheduler.profile_quick)


def calibrate(cfg: Config, runner: ModelRunner, quick: bool = False) -> PerfModel | None:
    """On every rank: take a new profile (a full one unless `quick`); rank 0 stores and returns it."""
    path = profile_path(cfg, runner.args, runner.ctx.device)
    if runner.ctx.rank == 0:
        print(f"profiling this hardware for the performance model (stored in {path})", file=sys.stderr)
    for attempt in range(1 + RETAKES):
        model = Profiler(cfg, runner).run(quick)
        off = [implausible_weights(model) if model is not None else None]
        dist.broadcast_object_list(off, src=0, group=runner.ctx.cpu_group)
        if not off[0]:
            break
        if runner.ctx.rank == 0:
            again = "taking the profile again" if attempt < RETAKES else f"stored as it is after {attempt + 1} tries"
            print(
                f"the kernels' timings disagree with whole steps (fitted weights {off[0]}, plausible "
                f"{PLAUSIBLE_WEIGHTS[0]}-{PLAUSIBLE_WEIGHTS[1]}): the machine was busier or slower while "
                f"they were timed; {again}",
                file=sys.stderr,
            )
    if model is not None:
        model.key = path.stem
        model.report["implausible_weights"] = off[0]
        model.save(path)
    return model


# A kernel inside a whole step against alone: caches make it a little faster or slower (0.7-1.3 on CPUs);
# a weight beyond these means its kernels were timed in a slow or fast spell of a shared machine.
PLAUSIBLE_WEIGHTS = (0.5, 2.0)
RETAKES = 2  # profiles taken again when their weights are implausible


def implausible_weights(model: PerfModel) -> dict[str, float]:
    low, high = PLAUSIBLE_WEIGHTS
    return {name: round(weight, 3) for name, weight in model.weights.items() if not low <= weight <= high}


class Profiler:
    def __init__(self, cfg: Config, runner: ModelRunner):
        self.cfg, self.runner, self.ctx, self.device = cfg, runner, runner.ctx, runner.ctx.device
        self.probes = StepProbes(runner)
        self.executor = Executor(runner)
        self.layout = KVPLayout.of(cfg)
        self.capacity = runner.num_blocks * cfg.cache.block_size  # slots in this rank's KV pool
        self.max_tokens = min(cfg.scheduler.max_num_batched_tokens, self.capacity // 2)
        self.max_context = min(self.layout.group_tokens, self.capacity - self.max_tokens)
        # A whole step's sequence may hold KV in every group, as a long request does, where a group's pool
        # holds a whole shard: then each group it spans runs it, and every layer merges their outputs.
        spans = self.max_context == self.layout.group_tokens
        self.max_sequence_context = self.layout.num_groups * self.max_context - 1 if spans else self.max_context
        self.used_slots = self.max_context + self.max_tokens  # what one sequence's probes read
        self.step_blocks = min(runner.num_blocks, 4 * -(-self.used_slots // cfg.cache.block_size))  # whole steps'

    @torch.inference_mode()
    def run(self, quick: bool) -> PerfModel | None:
        self.reps = 3 if quick else 5
        self.probes.fill_cache(self.step_blocks * self.cfg.cache.block_size)
        measured = self._components(quick)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measured, group=self.ctx.cpu_group)
        if self.ctx.rank != 0:
            self.executor.follow()  # rank 0 now times whole steps
            return None
        model = self._fit_components(gathered)
        slowest = 0.25 if quick else 2.0  # seconds of kernel time a random step may take
        calibration, held_out = (
            self._shapes(model, seed, count, slowest)
            for seed, count in ((1, 16 if quick else 40), (2, 8 if quick else 24))
        )
        steps = [
            (shape, self._time_step(shape))
            for shape in tqdm(calibration + held_out, desc="whole steps", file=sys.stderr, leave=False)
        ]
        wake_steps = self._wake_ticks(model, calibration[: 4 if quick else 8])
        self.executor.shutdown()
        self._fit_overhead(model, steps[: len(calibration)])
        model.wake = statistics.median(after / back for back, after in wake_steps)
        errors = [abs(self._predict(model, shape) - seconds) / seconds for shape, seconds in steps[len(calibration) :]]
        model.report = {
            "hardware": hardware_name(self.device),
            "dtype": self.cfg.model.dtype,
            "quick": quick,
            "layout": {"tp": self.cfg.parallel.tp, "spp": self.cfg.parallel.spp, "kvp": self.cfg.parallel.kvp},
            "held_out_steps": len(errors),
            "median_abs_error": statistics.median(errors),
            "p90_abs_error": float(np.percentile(errors, 90)),
            "max_abs_error": max(errors),
            # every whole step timed, so that the fit can be examined and redone without the hardware
            "calibration": self._records(model, steps[: len(calibration)]),
            "held_out": self._records(model, steps[len(calibration) :]),
            "wake_steps": [{"back_to_back_s": back, "after_idle_s": after} for back, after in wake_steps],
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(
            f"performance model: median |error| {model.report['median_abs_error']:.1%}, p90 "
            f"{model.report['p90_abs_error']:.1%}, max {model.report['max_abs_error']:.1%} "
            f"over {len(errors)} held-out batch shapes",
            file=sys.stderr,
        )
        return model

    # --- 1. kernels on every rank ----------------------------------------------------------------
    def _grids(self, quick: bool):
        """Powers of two up to the largest step and context this engine can run, and those largest
        themselves: the longest chunks at the longest contexts are where long prompts spend their time,
        and a curve extended beyond its last point misses what changes there (caches overflowing). A
        grid point within a factor of two of the largest is left out: the slope between two near points
        is mostly noise, and the curves are extended along it (a step's decodes read the sum of their
        contexts, far beyond the longest)."""
        tokens = [
            t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if 2 * t <= self.max_tokens
        ]
        queries = [q for q in (1, 8, 32, 128, 512, 2048, 8192) if 2 * q <= self.max_tokens]
        contexts = [n for n in (0, 256, 1024, 4096, 16384, 65536, 262144) if 2 * n <= self.max_context]
        if quick:
            tokens, queries = tokens[::2], queries[::2]
        return tokens + [self.max_tokens], queries + [self.max_tokens], contexts + [self.max_context]

    def _rows(self, tokens: list[int], quick: bool) -> list[int]:
        """Token counts of the linear part and the LM head: the grid's, and in a full profile every count up
        to `FEW_ROWS` (and to `max_num_seqs`, every count a decode batch can have). Few-row matrix kernels
        work in tiles of rows, so a batch a few rows past a tile's end costs nearly a tile more, and between
        powers of two the time is far from the straight line through them, the counts that fill their
        tiles: on a CPU in float32, 15 rows took twice as long as 16, and 250 rows 1.2× the line from 128 to
        256. Past `FEW_ROWS`, where the kernel changes, the time is a straight line again."""
        if quick:
            return tokens
        dense = min(max(self.cfg.scheduler.max_num_seqs, FEW_ROWS), self.max_tokens // 2)
        return sorted({*tokens, *range(1, dense + 1)})

    def _components(self, quick: bool) -> dict:
        tokens, queries, contexts = self._grids(quick)
        heads, d = self.probes.num_heads, self.runner.args.head_dim
        flop_cap = 2e10 if quick else 1e11  # skip attention points slower than about a second
        measured = {"linear": {}, "attention": {}, "lm_head": {}, "merge": {}, "hand_over": {}}
        rows = self._rows(tokens, quick)
        points = [("linear", t) for t in rows]
        points += [
            ("attention", (q, n))
            for q in queries
            for i, n in enumerate(contexts)
            if i < 2 or 4 * q * n * heads * d <= flop_cap
        ]
        if self.ctx.last_stage:
            points += [("lm_head", r) for r in rows if r <= self.cfg.scheduler.max_num_seqs]
        # Collectives are timed back to back: each rank reaches one when it has done its own work before it.
        # They have no tiles of rows: the grid's token counts (every count would add only the network's noise).
        collectives = [("merge", t) for t in tokens] if self.ctx.kvp_size > 1 else []
        collectives += [("hand_over", t) for t in tokens] if self.ctx.num_stages > 1 else []
        with tqdm(
            total=self.reps * len(points) + len(collectives), desc="kernels", file=sys.stderr, leave=False,
            disable=self.ctx.rank != 0,
        ) as bar:  # fmt: skip
            fns = {(kind, point): self._probe(kind, point) for kind, point in points}
            timed = median_times(fns, self.reps, self.device, bar.update, before=self.probes.evict_caches)
            for (kind, point), seconds in timed.items():
                measured[kind][point] = seconds
            del fns
            for kind, point in collectives:
                measured[kind][point] = median_time(self._probe(kind, point), self.reps, self.device)
                bar.update(1)
        return measured

    def _probe(self, kind: str, point):
        probe = getattr(self.probes, kind)
        return probe(*point, self.used_slots) if kind == "attention" else probe(point)

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
        return PerfModel(
            key="",
            layers=len(stage_layers(self.runner.args.num_layers, self.ctx.num_stages, 0)),
            stages=self.ctx.num_stages,
            linear=curve(worst("linear")),
            attention=AttentionFit(
                queries,
                [curve({n: s for (q2, n), s in attention.items() if q2 == q}) for q in queries],
            ),
            lm_head=curve(worst("lm_head")),
            merge=curve(worst("merge")),
            hand_over=curve(worst("hand_over")),
        )

    def _shapes(self, model: PerfModel, seed: int, count: int, slowest: float) -> list[list[tuple[int, int, bool]]]:
        """Random batches of (query tokens, cached tokens, sampled), each predicted to take at most
        `slowest` seconds: up to 32 decodes and up to two prefill chunks, sizes and contexts log-uniform
        so that small steps are as common as big ones; and, one in four, a long request decoding beside
        up to three short ones, the steps a long context spends its decode in (and, under KVP, every
        layer merges). A chunk stops at a KVP group's boundary, as the scheduler's do."""
        rng = random.Random(seed)

        def log_uniform(low: int, high: int) -> int:
            return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))

        def mixed() -> list[tuple[int, int, bool]]:
            seqs = self.cfg.scheduler.max_num_seqs
            decodes = [
                (1, log_uniform(1, self.max_sequence_context), True) for _ in range(rng.randint(0, min(seqs, 32)))
            ]
            room, chunks = self.max_tokens - len(decodes), []
            for _ in range(rng.randint(0 if decodes else 1, min(2, seqs - len(decodes)))):
                if room < 1:
                    break
                n = rng.choice([0, log_uniform(1, self.max_sequence_context)])
                q = min(log_uniform(1, min(room, 2048)), self.layout.tokens_to_boundary(n))
                chunks.append((q, n, rng.random() < 0.5))  # a prompt's last chunk samples, the others do not
                room -= q
            return decodes + chunks

        def long_decode() -> list[tuple[int, int, bool]]:
            others = min(3, self.cfg.scheduler.max_num_seqs - 1)
            long = (1, log_uniform(self.max_sequence_context // 4, self.max_sequence_context), True)
            short = min(4096, self.max_context)
            return [long] + [(1, log_uniform(1, short), True) for _ in range(rng.randint(0, others))]

        shapes, attempts = [], 0
        while len(shapes) < count:
            shape = long_decode() if len(shapes) % 4 == 3 else mixed()
            attempts += 1
            if shape and (self._predict(model, shape) <= slowest or attempts > 1000):  # a slow model: take any
                shapes.append(shape)
        return shapes

    def _first_group(self, index: int, context: int) -> int:
        """Sequence `index` starts at group index mod K, or as much earlier as its KV needs groups after it."""
        return min(index % self.layout.num_groups, self.layout.num_groups - 1 - self.layout.shard(context))

    def _groups(self, shape) -> list[GroupLoad]:
        """What each KVP group runs of this batch, as the scheduler composes it (`chunk_shapes`)."""
        loads = [GroupLoad(tokens_left=0) for _ in range(self.layout.num_groups)]
        for i, (q, n, sampled) in enumerate(shape):
            for g, seq, rows, merged in chunk_shapes(self.layout, self._first_group(i, n), n, q, sampled):
                loads[g].add(seq, rows, merged)
        return [load for load in loads if load.sequences]

    def _predict(self, model: PerfModel, shape) -> float:
        return max(load.time(model) for load in self._groups(shape))

    def _records(self, model: PerfModel, steps) -> list[dict]:
        return [
            {
                "sequences": [list(seq) for seq in shape],
                "measured_s": seconds,
                "predicted_s": self._predict(model, shape),
            }
            for shape, seconds in steps
        ]

    def _micro_batches(self, shapes) -> tuple[list[list[Chunk]], dict]:
        """Each shape as a micro-batch, and the block tables of all of them (request ids apart). Each
        sequence has KV blocks of its own in each group it spans, as in a real step (sequences reading the
        same blocks would find each other's KV in the CPU's caches), one after another in the group's first
        `step_blocks`."""
        layout, block_size = self.layout, self.cfg.cache.block_size
        batches, tables, next_block = [], {}, [0] * layout.num_groups
        for shape in shapes:
            batches.append([])
            for q, n, sampled in shape:
                i, first = len(tables), self._first_group(len(batches[-1]), n)
                holders = layout.holders(first, n)
                batches[-1].append(Chunk(i, [1] * q, n, holders, sampling=GREEDY if sampled else None))
                group_tables = []
                for g in holders:
                    blocks = -(-(layout.cached_tokens(first, n, g) + q * (g == holders[-1])) // block_size)
                    if next_block[g] + blocks > self.step_blocks:  # the blocks run out: start again from the first
                        next_block[g] = 0
                    group_tables.append(list(range(next_block[g], next_block[g] + blocks)))
                    next_block[g] += blocks
                tables[i] = (first, group_tables)
        return batches, tables

    def _ticks(self, batches: list[list[Chunk]], tables: dict, pauses: list[float], desc: str = "") -> list[float]:
        """Rank 0's seconds of `len(pauses)` pipeline ticks, the micro-batches `batches` entering in turn
        and the i-th measured tick `pauses[i]` seconds after the one before it: timed once the pipeline is
        full, which the first ticks fill (the first also sends the block tables) and the last drain; with a
        progress bar where `desc` names it."""
        stages, count = self.ctx.num_stages, len(batches)
        fill = stages - 1
        end = fill + len(pauses)  # ticks that take a micro-batch in

        def entering(tick: int) -> list[Chunk]:
            return batches[tick % count] if 0 <= tick < end else []

        times = []
        for tick in tqdm(range(end + fill), desc=desc, file=sys.stderr, leave=False, disable=not desc):
            measured = fill <= tick < end
            if measured and pauses[tick - fill]:
                time.sleep(pauses[tick - fill])
            plan = StepPlan(
                stages=[entering(tick - s) for s in range(stages)], block_tables=tables if tick == 0 else {}
            )
            start = time.perf_counter()
            self.executor.run(plan)
            if measured:
                times.append(time.perf_counter() - start)
        self.executor.run(StepPlan(stages=[[] for _ in range(stages)], released=list(tables)))
        return times

    def _time_step(self, shape) -> float:
        """Rank 0's seconds per pipeline tick with this micro-batch in every stage (median of reps, after
        one unmeasured tick with the pipeline full)."""
        (chunks,), tables = self._micro_batches([shape])
        return statistics.median(self._ticks([chunks], tables, [0.0] * (self.reps + 1))[1:])

    def _wake_ticks(self, model: PerfModel, shapes) -> list[tuple[float, float]]:
        """These micro-batches through the pipeline in turn, a different one entering each tick as in
        serving, in passes over all of them: back to back, then each tick after a pause of
        `model.wake_after_s` (the engine idle), reps times. Per micro-batch entering, the median tick of
        each kind: [(back to back, after the pause)]."""
        batches, tables = self._micro_batches(shapes)
        count, fill = len(batches), self.ctx.num_stages - 1
        pauses = ([0.0] * count + [model.wake_after_s] * count) * self.reps
        ticks = {(paused, i): [] for paused in (False, True) for i in range(count)}
        for j, seconds in enumerate(self._ticks(batches, tables, pauses, desc="ticks after idle")):
            ticks[pauses[j] > 0, (fill + j) % count].append(seconds)
        median = statistics.median
        return [(median(ticks[False, i]), median(ticks[True, i])) for i in range(count)]

    def _fit_overhead(self, model: PerfModel, steps) -> None:
        """Whole step ≈ overhead + per_sequence × sequences + hand-over + Σ weight × measured term, by
        non-negative least squares on the relative error (short steps count as much as long ones). The
        probes run their kernels as a step does (their own KV, layers in turn), so each weight is pulled
        towards 1 (`WEIGHT_PRIOR`): a weight moves as far as the steps demand, not as far as the noise of
        a shared machine takes it (weights fitted freely went from 0.7 to 1.3 between two profiles)."""
        features, targets = [], []
        for shape, seconds in steps:
            slowest = max(self._groups(shape), key=lambda load: load.time(model))
            terms = model.terms(slowest.sequences, slowest.sampled_rows, slowest.merged_rows)
            features.append([1.0, len(slowest.sequences)] + [terms[name] for name in FITTED_TERMS])
            targets.append((seconds - terms["hand_over"]) / seconds)
        features = np.array(features) / np.array([seconds for _, seconds in steps])[:, None]
        prior = np.hstack([np.zeros((len(FITTED_TERMS), 2)), np.eye(len(FITTED_TERMS))]) * WEIGHT_PRIOR
        features = np.vstack([features, prior])
        targets = np.concatenate([targets, np.full(len(FITTED_TERMS), WEIGHT_PRIOR)])
        overhead, per_sequence, *weights = nonnegative_least_squares(features, targets)
        model.overhead_s, model.per_sequence_s = overhead, per_sequence
        model.weights = dict(zip(FITTED_TERMS, weights))


# How strongly the fitted weights are held to 1: a weight 0.1 away costs as much as one step predicted 10% off.
WEIGHT_PRIOR = 1.0


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> list[float]:
    """min |a x − b| with x >= 0: least squares, dropping the most negative unknown until none is."""
    free = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        x[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        if x.min() >= 0:
            return [float(v) for v in x]
        free.remove(int(np.argmin(x)))
