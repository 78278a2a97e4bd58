"""Paged KV cache: a pool of fixed-size blocks on every rank, handed out by rank 0."""
from __future__ import annotations

import math

import torch


class BlockAllocator:
    """Rank 0's book of free blocks. A request reserves all blocks it can ever need on admission."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def reserve(self, num_tokens: int) -> list[int]:
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise MemoryError(f"{n} KV blocks wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))


class KVPlacement:
    """Rank 0's book of the blocks of every KVP group, and of where a request's KV goes.

    A request of up to `max_len` tokens spans consecutive groups; the i-th holds its positions
    [i·L, (i+1)·L) with L = `group_tokens`. All of its blocks, in every group, are reserved at once.
    """

    def __init__(self, num_groups: int, num_blocks: int, block_size: int, group_tokens: int):
        self.allocators = [BlockAllocator(num_blocks, block_size) for _ in range(num_groups)]
        self.group_tokens = group_tokens

    def shard_tokens(self, max_len: int) -> list[int]:
        """Tokens each spanned group holds of a request of `max_len` tokens."""
        L = self.group_tokens
        return [min(L, max_len - start) for start in range(0, max_len, L)]

    @property
    def blocks_per_group(self) -> int:
        return self.allocators[0].num_blocks

    def blocks_needed(self, max_len: int) -> int:
        """Blocks the request's largest shard needs from one group."""
        return self.allocators[0].blocks_for(self.shard_tokens(max_len)[0])

    def reserve(self, max_len: int) -> tuple[int, list[list[int]]] | None:
        """(first group, block table per spanned group), or None while no run of groups has room.
        Picks the run with the most free blocks, which spreads short requests over the groups."""
        shards = self.shard_tokens(max_len)
        runs = [first for first in range(len(self.allocators) - len(shards) + 1)
                if all(self.allocators[first + i].can_reserve(n) for i, n in enumerate(shards))]
        if not runs:
            return None
        first = max(runs, key=lambda f: min(self.allocators[f + i].num_free for i in range(len(shards))))
        return first, [self.allocators[first + i].reserve(n) for i, n in enumerate(shards)]

    def free(self, first_group: int, tables: list[list[int]]) -> None:
        for i, table in enumerate(tables):
            self.allocators[first_group + i].free(table)


class KVCache:
    """K and V of this rank's layers and KV heads: `[layers, kv_heads, num_blocks × block_size, head_dim]`.

    A token's slot is `block_id × block_size + offset`; a head's keys are rows of one matrix, which
    is the layout the attention kernels read.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        # Uninitialised: attention reads only slots already written, and untouched pages cost nothing.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype.itemsize

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slots of token positions [start, end) of a sequence with this block table."""
        positions = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def index(self, block_table: list[int], start: int, end: int) -> torch.Tensor | slice:
        """Slots of positions [start, end) as a slice when their blocks are consecutive (attention then
        reads the cache in place, and the cost does not grow with the context), else as a tensor."""
        first = start // self.block_size
        blocks = block_table[first: (end - 1) // self.block_size + 1]
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            offset = (blocks[0] - first) * self.block_size
            return slice(offset + start, offset + end)
        return self.slots(block_table, start, end)

