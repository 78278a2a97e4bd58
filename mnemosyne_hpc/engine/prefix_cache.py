"""Which KV blocks of a request another request may reuse: block identities by content and position.

A request's KV blocks are laid out per KVP group: its i-th group holds positions [i·L, (i+1)·L) in
blocks of `block_size` tokens from the group's first position on (the last block of a group is
shorter when L is not a multiple of the block size). A block is *complete* once all its positions are
known; its identity is a hash of its tokens and of the identity of the block before it, so two
requests' blocks match only when everything before them matches too, and at the same positions. Model,
dtype and layout are those of the process, the same for every block of its cache.

The blocks themselves, their reference counts and the least recently used order of the unreferenced
ones are the block books' (`kv_cache.BlockAllocator`); this module names blocks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout


@dataclass(frozen=True)
class BlockGrid:
    """Where a request's k-th block lies, for a KVP layout and a block size."""

    layout: KVPLayout
    block_size: int

    @property
    def blocks_per_group(self) -> int:
        return math.ceil(self.layout.group_tokens / self.block_size)

    def shard_and_index(self, k: int) -> tuple[int, int]:
        """The block's shard (index among the request's groups) and its index in that shard's table."""
        return divmod(k, self.blocks_per_group)

    def start(self, k: int) -> int:
        """The block's first position."""
        shard, index = self.shard_and_index(k)
        return shard * self.layout.group_tokens + index * self.block_size

    def end(self, k: int) -> int:
        """The position after the block's last one."""
        return min(self.start(k) + self.block_size, (k // self.blocks_per_group + 1) * self.layout.group_tokens)

    def complete_blocks(self, num_tokens: int) -> int:
        """Blocks all of whose positions lie within the first `num_tokens`."""
        shards, rest = divmod(num_tokens, self.layout.group_tokens)
        return shards * self.blocks_per_group + rest // self.block_size


def extend_hashes(hashes: list[bytes], token_ids, grid: BlockGrid, num_tokens: int) -> list[bytes]:
    """`hashes` (the identities of a request's first blocks) extended to its complete blocks within
    `num_tokens` of `token_ids` (a callable (start, end) → token ids), in place."""
    for k in range(len(hashes), grid.complete_blocks(num_tokens)):
        block = np.asarray(token_ids(grid.start(k), grid.end(k)), dtype=np.int64).tobytes()
        hashes.append(hashlib.blake2b(hashes[-1] + block if hashes else block, digest_size=16).digest())
    return hashes
