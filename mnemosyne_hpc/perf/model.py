"""Predicted time of one engine iteration from the shape of its batch, calibrated on this hardware.

A KVP group's micro-batch on one pipeline stage costs

    overhead + per_sequence · S + w_linear · layers · linear(T)
      + layers · (w_decode · attention(1, Σ_{q_i = 1} n_i) + w_prefill · Σ_{q_i > 1} attention(q_i, n_i))
      + w_lm_head · lm_head(R) + w_merge · layers · merge(M) + hand_over(T)

for T tokens in S sequences, sequence i running q_i query tokens over n_i cached tokens, M rows merged
over KVP groups and R sampled rows (a step's decodes are one kernel call over all their keys; each
prefill chunk is a call of its own). Every curve is measured on the real kernels by `calibrate.py`
(`python -m mnemosyne_hpc.profile`, or at start-up when no profile is stored); the overheads and the
weights w (a kernel runs faster or slower inside a whole step than alone, as caches hold other data; a
merge inside a step waits for the slowest group) are fitted to whole engine steps.

A step that starts after the engine sat idle for `wake_after_s` or longer takes `wake` times as long
(processors sleep, clocks drop and caches go cold while nothing runs), measured on whole steps run in
turn, back to back and each after a pause of that length.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Curve:
    """Piecewise-linear y(x) through measured points, extended linearly beyond the last one."""

    x: list[float]
    y: list[float]

    def __call__(self, value: float) -> float:
        """np.interp's value (y[0] left of x[0]) in plain Python: the scheduler and the
        simulator call curves hundreds of thousands of times, and np.interp on lists costs 5 µs a call."""
        x, y = self.x, self.y
        if len(x) == 1:
            return y[0]
        if value > x[-1]:
            return y[-1] + (y[-1] - y[-2]) / (x[-1] - x[-2]) * (value - x[-1])
        if value <= x[0]:
            return float(y[0])
        i = bisect.bisect_left(x, value)
        return float(y[i] if x[i] == value else y[i - 1] + (y[i] - y[i - 1]) * (value - x[i - 1]) / (x[i] - x[i - 1]))


@dataclass
class AttentionFit:
    """One layer's attention of q query tokens over n cached tokens (plus themselves, causally): for
    each measured q a curve over n through its measured points (caches overflow somewhere along it),
    interpolated linearly between measured q and extended along the last two beyond the largest."""

    queries: list[float]
    contexts: list[Curve]  # seconds against n, one per query count

    @classmethod
    def linear(cls, queries: list[float], intercepts: list[float], slopes: list[float]) -> "AttentionFit":
        """intercept(q) + slope(q) · n."""
        return cls(list(queries), [Curve([0.0, 1.0], [i, i + s]) for i, s in zip(intercepts, slopes)])

    def __call__(self, q: int, n: int) -> float:
        queries, curves = self.queries, self.contexts
        if len(queries) == 1 or q <= queries[0]:
            return curves[0](n)
        i = min(bisect.bisect_left(queries, q), len(queries) - 1)  # q in (queries[i-1], queries[i]], or beyond
        share = (q - queries[i - 1]) / (queries[i] - queries[i - 1])
        return (1 - share) * curves[i - 1](n) + share * curves[i](n)


FITTED_TERMS = ("linear", "decode_attention", "prefill_attention", "lm_head", "merge")


@dataclass(frozen=True)
class SequenceShape:
    query_tokens: int
    cached_tokens: int  # KV tokens of this group read before the queries


@dataclass
class PerfModel:
    key: str
    layers: int  # layers of the largest pipeline stage
    stages: int
    linear: Curve  # one layer's projections, MLP and TP all-reduces, against batch tokens
    attention: AttentionFit
    lm_head: Curve  # final norm, LM head and sampling, against sampled rows
    merge: Curve | None = None  # one layer's KVP all-gather and merge, against merged rows
    hand_over: Curve | None = None  # SPP send/receive of hidden states, against tokens
    overhead_s: float = 0.0  # per step: plan broadcast, metadata, embedding, Python
    per_sequence_s: float = 0.0
    wake: float = 1.0  # a step after an idle spell of wake_after_s or longer over one back to back
    wake_after_s: float = 0.5
    weights: dict = field(default_factory=lambda: dict.fromkeys(FITTED_TERMS, 1.0))  # kernel time in a step / alone
    report: dict = field(default_factory=dict)  # how the profile was taken and its held-out error

    def __post_init__(self):
        self.weights = {**dict.fromkeys(FITTED_TERMS, 1.0), **self.weights}  # a term never fitted (older profiles): 1

    def terms(self, sequences: list[SequenceShape], sampled_rows: int, merged_rows: int = 0) -> dict[str, float]:
        """Seconds of each measured term, before the fitted weights."""
        tokens = sum(s.query_tokens for s in sequences)
        decoded = [s.cached_tokens for s in sequences if s.query_tokens == 1]  # memory-bound
        prefill = sum(self.attention(s.query_tokens, s.cached_tokens) for s in sequences if s.query_tokens > 1)
        return {
            "linear": self.layers * self.linear(tokens),
            "decode_attention": self.layers * self.attention(1, sum(decoded)) if decoded else 0.0,
            "prefill_attention": self.layers * prefill,
            "lm_head": self.lm_head(sampled_rows) if sampled_rows else 0.0,
            "merge": self.layers * self.merge(merged_rows) if merged_rows and self.merge is not None else 0.0,
            "hand_over": self.hand_over(tokens) if self.hand_over is not None else 0.0,
        }

    def batch_time(self, sequences: list[SequenceShape], sampled_rows: int, merged_rows: int = 0) -> float:
        """Seconds one stage of one KVP group needs for this micro-batch."""
        if not sequences:
            return 0.0
        terms = self.terms(sequences, sampled_rows, merged_rows)
        return (
            self.overhead_s
            + self.per_sequence_s * len(sequences)
            + terms["hand_over"]
            + sum(self.weights[name] * terms[name] for name in FITTED_TERMS)
        )

    @functools.lru_cache(maxsize=4096)
    def prefill_time(self, tokens: int, chunk: int = 512) -> float:
        """Seconds to prefill `tokens` tokens alone in chunks of `chunk`, through every stage. The times of
        whole chunks are kept as running sums: the scheduler asks about the prefix prefilled so far at every
        step, and at millions of tokens a sum from the first chunk would cost thousands of chunks a call."""
        if tokens <= 0:
            return 0.0
        whole = (tokens - 1) // chunk  # whole chunks before the last one
        sums = self.__dict__.setdefault("_prefill_sums", {}).setdefault(chunk, [0.0])
        while len(sums) <= whole:
            sums.append(sums[-1] + self.batch_time([SequenceShape(chunk, (len(sums) - 1) * chunk)], 0))
        ticks = sums[whole] + self.batch_time([SequenceShape(tokens - whole * chunk, whole * chunk)], 0)
        return ticks + (self.stages - 1) * self.batch_time([SequenceShape(min(chunk, tokens), 0)], 0)

    def after_idle(self, seconds: float, idle_s: float) -> float:
        """A step's `seconds` when it starts `idle_s` after the one before it ended."""
        return self.wake * seconds if idle_s >= self.wake_after_s else seconds

    def __hash__(self) -> int:  # for lru_cache: one model object, one cache
        return id(self)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "PerfModel":
        data = json.loads(Path(path).read_text())
        if "queries" not in data["attention"]:
            raise ValueError(
                f"{path}: a profile of an older format (one line per query count); take it again with "
                "python -m mnemosyne_hpc.profile"
            )
        curve = lambda d: None if d is None else Curve(**d)  # noqa: E731
        return cls(
            **{
                **data,
                "linear": curve(data["linear"]),
                "lm_head": curve(data["lm_head"]),
                "merge": curve(data["merge"]),
                "hand_over": curve(data["hand_over"]),
                "attention": AttentionFit(
                    data["attention"]["queries"], [curve(c) for c in data["attention"]["contexts"]]
                ),
            }
        )
