"""The step plan: everything every rank needs to run one engine iteration. Plain, picklable data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mnemosyne_hpc.engine.request import SamplingParams


@dataclass
class Chunk:
    """Tokens of one request to run this step: a prefill chunk or a single decode token."""

    request_id: int
    token_ids: list[int]
    start_pos: int  # position of token_ids[0]; tokens before it are in the KV cache
    block_table: list[int]  # the request's KV blocks up to the end of this chunk
    sampling: Optional[SamplingParams]  # set when the chunk ends the known tokens: sample the next one


MicroBatch = list[Chunk]


@dataclass
class StepPlan:
    """One lock-step pipeline tick: `stages[s]` is the micro-batch pipeline stage s runs.

    `stages[0]` enters the pipeline now; `stages[s]` entered s ticks ago, and stage s receives
    its hidden states from what stage s − 1 computed on the previous tick.
    """

    stages: list[MicroBatch] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # finished requests: drop their sampler state
    return_logits: bool = False  # the last stage also sends the sampled rows' logits to rank 0
    shutdown: bool = False

    @property
    def entering(self) -> MicroBatch:
        return self.stages[0]

    @property
    def leaving(self) -> MicroBatch:
        return self.stages[-1]
