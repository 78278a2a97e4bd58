"""The step plan: everything every rank needs to run one engine iteration. Plain, picklable data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mnemosyne_hpc.engine.request import SamplingParams


@dataclass
class Chunk:
    """Tokens of one request to run this step: a prefill chunk or a single decode token, run by the
    KVP groups `groups` (its holders, `KVPLayout.holders`): the last of them stores its KV, the first
    (the request's first group) samples."""

    request_id: int
    token_ids: list[int]
    start_pos: int  # position of token_ids[0]; tokens before it are in the KV cache
    groups: range
    sampling: Optional[SamplingParams]  # set when the chunk ends the known tokens: sample the next one
    # Prompt log-probabilities wanted: row i's next token is prompt_targets[i] (rows past the prompt have
    # none), with `prompt_top` alternatives.
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top: int = 0

    @property
    def first_group(self) -> int:
        return self.groups.start

    @property
    def owner(self) -> int:
        return self.groups[-1]

    @property
    def logprob_rows(self) -> int:
        """Rows of log-probabilities its sampler sends: its prompt targets', then the sampled token's."""
        return len(self.prompt_targets) + (self.sampling is not None and self.sampling.logprobs is not None)

    @property
    def top_logprobs(self) -> int:
        """The most alternatives any of its rows asks for."""
        sampled = self.sampling.logprobs if self.sampling is not None else None
        return max(self.prompt_top if self.prompt_targets else 0, sampled or 0)

    @property
    def sample_position(self) -> int:
        """Position of the token this chunk samples."""
        return self.start_pos + len(self.token_ids)


MicroBatch = list[Chunk]


@dataclass
class StepPlan:
    """One lock-step pipeline tick: `stages[s]` is the micro-batch pipeline stage s runs.

    `stages[0]` enters the pipeline now; `stages[s]` entered s ticks ago, and stage s receives
    its hidden states from what stage s − 1 computed on the previous tick.
    """

    stages: list[MicroBatch] = field(default_factory=list)
    # Requests admitted or grown this tick: id → (first KVP group, block table per spanned group). Ranks
    # keep their group's table until the id is released, so a plan's size does not grow with the context.
    block_tables: dict[int, tuple[int, list[list[int]]]] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)  # finished or preempted requests: drop their tables
    return_logits: bool = False  # the last stage also sends the sampled rows' logits to rank 0
    shutdown: bool = False

    @property
    def entering(self) -> MicroBatch:
        return self.stages[0]

    @property
    def leaving(self) -> MicroBatch:
        return self.stages[-1]

    @property
    def sampled(self) -> MicroBatch:
        """The chunks that leave the pipeline this tick with a token to sample."""
        return [c for c in self.leaving if c.sampling is not None]

    def sampled_by(self, group: int) -> MicroBatch:
        """The sampled chunks whose token KVP group `group` samples: those of its requests' first group."""
        return [c for c in self.sampled if c.first_group == group]

    def with_logprobs_by(self, group: int) -> MicroBatch:
        """The chunks leaving this tick whose log-probabilities KVP group `group` computes."""
        return [c for c in self.leaving if c.first_group == group and c.logprob_rows]

    @property
    def top_logprobs(self) -> int:
        """Alternatives in every row of log-probabilities this tick: the most any chunk asks for."""
        return max((c.top_logprobs for c in self.leaving if c.logprob_rows), default=0)
