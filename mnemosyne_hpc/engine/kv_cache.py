"""Paged KV cache: a pool of fixed-size blocks on every rank, handed out by rank 0."""
from __future__ import annotations

import math

import numpy as np
import torch

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout


class BlockAllocator:
    """Rank 0's book of free blocks. It hands out consecutive blocks where it can: decode attention
    reads every run of consecutive blocks in place, and prefill attention reads a prefix in place
    only when it is one run (else it gathers it)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._is_free = np.ones(num_blocks, dtype=bool)
        self.num_free = num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def reserve(self, num_tokens: int, after: int | None = None) -> list[int]:
        """Blocks for `num_tokens` tokens: the ones right after block `after` if they are free, else
        the first run of free blocks long enough, else the lowest free blocks."""
        n = self.blocks_for(num_tokens)
        if n == 0:
            return []
        if n > self.num_free:
            raise MemoryError(f"{n} KV blocks wanted, {self.num_free} free")
        if after is not None and after + 1 + n <= self.num_blocks and self._is_free[after + 1: after + 1 + n].all():
            blocks = np.arange(after + 1, after + 1 + n)
        else:
            free_before = np.concatenate(([0], np.cumsum(self._is_free)))
            runs = np.flatnonzero(free_before[n:] - free_before[:-n] == n)
            blocks = np.arange(runs[0], runs[0] + n) if len(runs) else np.flatnonzero(self._is_free)[:n]
        self._is_free[blocks] = False
        self.num_free -= n
        return blocks.tolist()

    def free(self, block_ids: list[int]) -> None:
        self._is_free[block_ids] = True
        self.num_free += len(block_ids)


class KVPlacement:
    """Rank 0's book of the blocks of every KVP group, and of where a request's KV goes (`layout`).

    Admission reserves the blocks of the prompt in every group it spans; decoding takes one block at
    a time from the group its new position falls in.
    """

    def __init__(self, layout: KVPLayout, num_blocks: int, block_size: int):
        self.layout = layout
        self.allocators = [BlockAllocator(num_blocks, block_size) for _ in range(layout.num_groups)]
        self.promised = [0] * layout.num_groups  # blocks that placed requests may still take as they grow

    @property
    def blocks_per_group(self) -> int:
        return self.allocators[0].num_blocks

    @property
    def total_blocks(self) -> int:
        return self.blocks_per_group * len(self.allocators)

    @property
    def blocks_in_use(self) -> int:
        return self.total_blocks - sum(a.num_free for a in self.allocators)

    @property
    def block_size(self) -> int:
        return self.allocators[0].block_size

    def blocks_needed(self, max_len: int) -> int:
        """Blocks the request's largest shard needs from one group."""
        return self.allocators[0].blocks_for(self.layout.shard_tokens(max_len)[0])

    def reserve(self, num_tokens: int, max_len: int) -> tuple[int, list[list[int]]] | None:
        """Blocks for the first `num_tokens` positions of a request that may grow to `max_len`:
        (first group, block table per spanned group), or None while no run of groups has room.
        Picks the run with the most free blocks, which spreads short requests over the groups."""
        shards = self.layout.shard_tokens(num_tokens)
        span = len(self.layout.shard_tokens(max_len))
        runs = [first for first in range(len(self.allocators) - span + 1)
                if all(self.allocators[first + i].can_reserve(n) for i, n in enumerate(shards))]
        if not runs:
            return None
        first = max(runs, key=lambda f: min(self.headroom(f + i) for i in range(span)))
        tables = [self.allocators[first + i].reserve(n) for i, n in enumerate(shards)]
        self._promise(first, tables, max_len, +1)
        return first, tables

    def headroom(self, group: int) -> int:
        """Free blocks of a group that no placed request may still claim."""
        return self.allocators[group].num_free - self.promised[group]

    def _promise(self, first_group: int, tables: list[list[int]], max_len: int, sign: int) -> None:
        for i, n in enumerate(self.layout.shard_tokens(max_len)):
            held = len(tables[i]) if i < len(tables) else 0
            self.promised[first_group + i] += sign * (self.allocators[0].blocks_for(n) - held)

    def covers(self, tables: list[list[int]], position: int) -> bool:
        shard = self.layout.shard(position)
        return shard < len(tables) and position % self.layout.group_tokens < len(tables[shard]) * self.block_size

    def extend(self, first_group: int, tables: list[list[int]], position: int) -> bool:
        """Add the block holding `position` to the tables; False when its group has no free block."""
        group, shard = self.layout.group_of(first_group, position), self.layout.shard(position)
        if self.allocators[group].num_free == 0:
            return False
        while len(tables) <= shard:
            tables.append([])
        table = tables[shard]
        table.extend(self.allocators[group].reserve(1, after=table[-1] if table else None))
        self.promised[group] -= 1
        return True

    def free(self, first_group: int, tables: list[list[int]], max_len: int) -> None:
        """Return a request's blocks, and its claim on the blocks it did not take."""
        self._promise(first_group, tables, max_len, -1)
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

    def _blocks(self, block_table: list[int], start: int, end: int) -> tuple[int, list[int]]:
        """The table index of the block holding position `start`, and the blocks holding [start, end):
        only those, since a decode's table grows with its context."""
        first = start // self.block_size
        return first, block_table[first: (end - 1) // self.block_size + 1]

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slots of token positions [start, end) of a sequence with this block table."""
        first, blocks = self._blocks(block_table, start, end)
        positions = torch.arange(start, end) - first * self.block_size
        return torch.tensor(blocks)[positions // self.block_size] * self.block_size + positions % self.block_size

    def runs(self, block_table: list[int], start: int, end: int) -> list[tuple[int, int]]:
        """Slots of positions [start, end) as runs of consecutive slots, (first slot, length) each: one
        run per stretch of consecutive blocks, which attention reads in place."""
        bs = self.block_size
        first, blocks = self._blocks(block_table, start, end)
        blocks = np.asarray(blocks)
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(blocks) != 1) + 1, [len(blocks)]))
        runs = []
        for begin, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            position = max(start, (first + begin) * bs)  # of the run's first slot
            runs.append((int(blocks[begin]) * bs + position - (first + begin) * bs,
                         min(end, (first + stop) * bs) - position))
        return runs

    def index(self, block_table: list[int], start: int, end: int) -> torch.Tensor | slice:
        """Slots of positions [start, end) as a slice when their blocks are consecutive (attention then
        reads the cache in place, and the cost does not grow with the context), else as a tensor."""
        if len(runs := self.runs(block_table, start, end)) == 1:
            return slice(runs[0][0], runs[0][0] + runs[0][1])
        return self.slots(block_table, start, end)
