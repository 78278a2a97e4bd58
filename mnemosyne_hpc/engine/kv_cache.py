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


class KVCache:
    """K and V of this rank's layers and KV heads: `[layers, kv_heads, num_blocks × block_size, head_dim]`.

    A token's slot is `block_id × block_size + offset`; a head's keys are rows of one matrix, which
    is the layout the attention kernels read.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype.itemsize

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slots of token positions [start, end) of a sequence with this block table."""
        positions = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size
