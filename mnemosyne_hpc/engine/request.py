"""Requests as rank 0 tracks them, and their sampling parameters."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields, replace
from typing import Optional

from mnemosyne_hpc.config import SamplingConfig
from mnemosyne_hpc.engine.detokenizer import TextOutput

MAX_LOGPROBS = 20  # alternatives a request may ask for, per token


class RequestError(ValueError):
    """Bad input in one request: reported to its client; nothing else is affected."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens at its position
    with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    @classmethod
    def from_request(cls, defaults: SamplingConfig, overrides: dict | None = None) -> "SamplingParams":
        """Defaults from the config, then the request's own fields; everything checked."""
        values = {f.name: getattr(defaults, f.name) for f in fields(cls)}
        unknown = set(overrides or {}) - set(values)
        if unknown:
            raise RequestError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        values.update(overrides or {})
        if isinstance(values["stop"], str):
            values["stop"] = [values["stop"]]
        params = cls(
            **{
                **values,
                "stop": _as_tuple(values["stop"], "stop"),
                "stop_token_ids": _as_tuple(values["stop_token_ids"], "stop_token_ids"),
            }
        )
        params._check()
        if params.seed is None:
            params = replace(params, seed=random.SystemRandom().randrange(2**63))
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _check(self) -> None:
        def number(x):  # finite, and within a float's range
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                return False
            try:
                return math.isfinite(float(x))
            except OverflowError:
                return False

        def integer(x):
            return isinstance(x, int) and not isinstance(x, bool)

        checks = [
            (number(self.temperature) and self.temperature >= 0, "temperature must be a number >= 0"),
            (integer(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (integer(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (self.seed is None or integer(self.seed), "seed must be an integer"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (all(integer(t) for t in self.stop_token_ids), "stop_token_ids must be a list of integers"),
            (isinstance(self.ignore_eos, bool), "ignore_eos must be true or false"),
            *(
                (
                    value is None or (integer(value) and 0 <= value <= MAX_LOGPROBS),
                    f"{name} must be in [0, {MAX_LOGPROBS}]",
                )
                for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)


def _as_tuple(value, name: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{name} must be a list")
    return tuple(value)


@dataclass
class Request:
    id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_len: int  # prompt + output tokens this request may reach (its KV reservation)
    arrival: float
    output_token_ids: list[int] = field(default_factory=list)
    num_scheduled: int = 0  # tokens that entered the pipeline (left stage 0 once this tick ends)
    num_computed: int = 0  # tokens that left the last stage: their K/V are in every stage's cache
    first_group: int = 0  # KVP group holding the first positions
    block_tables: list[list[int]] = field(default_factory=list)  # reserved KV blocks, per spanned KVP group
    prefill_len: int = 0  # tokens to prefill before decoding: the prompt, or everything known after a preemption
    # Prefix caching: identities of its complete blocks (prefix_cache.py), how many of them are
    # registered in the cache, the prompt tokens the cache held when it arrived and when it was first placed.
    block_identities: list[bytes] = field(default_factory=list)
    registered_blocks: int = 0
    cached_at_arrival: int = 0
    cached_tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0
    finish_time: Optional[float] = None
    output: Optional[TextOutput] = None  # the output as text (None without a tokenizer)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # sampling.logprobs: one per output token
    prompt_logprobs: list[Optional[TokenLogprob]] = field(default_factory=list)  # sampling.prompt_logprobs
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" (sampling failed)

    def __post_init__(self):
        self.prefill_len = self.prefill_len or len(self.prompt_token_ids)

    def preempt(self) -> None:
        """Drop the KV (the caller frees its blocks): everything known is prefilled again later."""
        self.num_scheduled = self.num_computed = self.registered_blocks = 0
        self.prefill_len = self.num_tokens
        self.block_tables = []
        self.preemptions += 1

    @property
    def text(self) -> str:
        return self.output.text if self.output is not None else ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[start:end] + self.output_token_ids[max(start - n, 0) : max(end - n, 0)]

    @property
    def num_unscheduled(self) -> int:
        """Known tokens not yet fed to the model: prompt left to prefill, or the last sampled token."""
        return self.num_tokens - self.num_scheduled

    @property
    def in_flight(self) -> bool:
        return self.num_scheduled > self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_scheduled < self.prefill_len

    @property
    def ttft_s(self) -> Optional[float]:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tbt_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]
