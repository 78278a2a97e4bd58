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


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # finished requests: drop their sampler state
    shutdown: bool = False
