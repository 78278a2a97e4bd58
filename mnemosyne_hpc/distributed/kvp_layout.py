"""Where a request's KV lives under KV-cache parallelism: the one owner of the token-range geometry.

A request's KV is split over consecutive KVP groups `first_group`, `first_group + 1`, …: the i-th holds
its positions [i·L, (i+1)·L), L = `group_tokens`. A chunk never crosses a group boundary. Every group
holding KV before a chunk runs it (its *holders*); the last of them, the chunk's *owner*, also stores
the chunk's own KV. The scheduler (to predict a chunk's cost), the block books and the model runner (to
execute it) all ask this object, so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVPLayout:
    num_groups: int
    group_tokens: int  # L

    @classmethod
    def of(cls, cfg) -> KVPLayout:
        """From a `Config`: L is `parallel.max_tokens_per_kvp_group`, or `cache.max_model_len` split
        evenly over the groups, rounded up to whole KV blocks."""
        parallel, cache = cfg.parallel, cfg.cache
        if parallel.max_tokens_per_kvp_group:
            return cls(parallel.kvp, parallel.max_tokens_per_kvp_group)
        blocks = math.ceil(math.ceil(cache.max_model_len / parallel.kvp) / cache.block_size)
        return cls(parallel.kvp, blocks * cache.block_size)

    def shard(self, position: int) -> int:
        """Index, among a request's groups, of the one holding `position`."""
        return position // self.group_tokens

    def group_of(self, first_group: int, position: int) -> int:
        return first_group + self.shard(position)

    def shard_tokens(self, num_tokens: int) -> list[int]:
        """Tokens each spanned group holds of a sequence of `num_tokens` tokens."""
        L = self.group_tokens
        return [min(L, num_tokens - start) for start in range(0, num_tokens, L)]

    def tokens_to_boundary(self, position: int) -> int:
        """The longest chunk starting at `position` that stays in one group."""
        return self.group_tokens - position % self.group_tokens

    def holders(self, first_group: int, start: int) -> range:
        """Groups that run a chunk starting at position `start`; the last is its owner."""
        return range(first_group, self.group_of(first_group, start) + 1)

    def cached_tokens(self, first_group: int, start: int, group: int) -> int:
        """Tokens of the request's KV before position `start` that holder `group` attends to: its whole
        shard, or, on the owner, the positions of its shard before `start`."""
        shard = group - first_group
        owner = self.shard(start)
        return start - shard * self.group_tokens if shard == owner else self.group_tokens
