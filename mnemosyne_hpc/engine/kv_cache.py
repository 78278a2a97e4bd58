"""Paged KV cache: a pool of fixed-size blocks on every rank, handed out by rank 0."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.prefix_cache import BlockGrid


class BlockAllocator:
    """Rank 0's book of one KVP group's blocks. It hands out consecutive blocks where it can: decode
    attention reads every run of consecutive blocks in place, and prefill attention reads a prefix in
    place only when it is one run (else it gathers it). A sequence placed with `room` to grow finds the
    free blocks after its own held open for it: others take them only when no other free block fits
    (where decode attention copies a sequence's runs together or reads each in a call of its own, as in
    float32 on a CPU, a decode whose KV lay in two runs took 19-135 µs more per layer: `bench/split_kv.py`).

    With prefix caching, a complete block whose KV is computed may be registered under its identity
    (`prefix_cache`): requests with the same prefix then share it (reference-counted), and when no
    request references it, it stays cached but counts as free, until a reservation needs it back; the
    least recently released go first."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._is_free = np.ones(num_blocks, dtype=bool)  # unreferenced and holding no cached KV
        self._held_open = np.zeros(num_blocks, dtype=bool)  # free, and left for the sequence before to grow into
        self._refs = np.zeros(num_blocks, dtype=np.int32)
        self._block_of: dict[bytes, int] = {}  # identity → block holding that KV
        self._identity_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached and unreferenced, oldest first
        self.num_free = num_blocks  # blocks a reservation may take: the free ones and the evictable ones

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def reserve(self, num_tokens: int, after: int | None = None) -> list[int]:
        """Blocks for `num_tokens` tokens: the ones right after block `after` if they are free, else
        the first run of free blocks long enough (one no growth holds open, if any), else the lowest
        free blocks."""
        return self.take(self.blocks_for(num_tokens), after)

    def take(self, n: int, after: int | None = None, room: int = 0) -> list[int]:
        """`n` blocks, as `reserve` picks them, evicting cached ones where the free ones do not suffice;
        elsewhere than right after `after`, the first run of free blocks with `room` more after it that
        no growth holds open (then held open for this sequence), else one without that room, else any run
        long enough (every hold dropped), else the lowest free blocks."""
        if n == 0:
            return []
        if n > self.num_free:
            raise MemoryError(f"{n} KV blocks wanted, {self.num_free} free")
        for _ in range(n - (self.num_free - len(self._evictable))):
            self._evict()
        if after is not None and after + 1 + n <= self.num_blocks and self._is_free[after + 1 : after + 1 + n].all():
            start = after + 1
        else:
            unclaimed = self._is_free & ~self._held_open
            start = first_run(unclaimed, n + room)
            if start is not None:
                self._held_open[start + n : start + n + room] = True
            else:
                start = first_run(unclaimed, n)
            if start is None:  # only blocks held open for growth fit: holding is a preference, dropped here
                self._held_open[:] = False
                start = first_run(self._is_free, n)
        blocks = np.arange(start, start + n) if start is not None else np.flatnonzero(self._is_free)[:n]
        self._is_free[blocks] = self._held_open[blocks] = False
        self._refs[blocks] = 1
        self.num_free -= n
        return blocks.tolist()

    def free(self, block_ids: list[int], room: int = 0) -> None:
        """Drop one reference to each block, and open the `room` blocks after the last that were held for
        its growth; a cached block nobody references becomes evictable, the last block of a sequence first
        (its prefix is the likelier to be asked for again)."""
        if block_ids:
            self._held_open[block_ids[-1] + 1 : block_ids[-1] + 1 + room] = False
        blocks = np.asarray(block_ids, dtype=np.int64)
        self._refs[blocks] -= 1
        released = blocks[self._refs[blocks] == 0]
        cached = [b for b in released[::-1].tolist() if b in self._identity_of] if self._identity_of else []
        self._evictable.update(dict.fromkeys(cached))
        self._is_free[released] = True
        self._is_free[cached] = False
        self.num_free += len(released)

    def lookup(self, identity: bytes) -> int | None:
        """The block holding the KV of the block `identity` names, if cached."""
        return self._block_of.get(identity)

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def share(self, block: int) -> None:
        """One more reference to a cached block."""
        if block in self._evictable:
            del self._evictable[block]
            self.num_free -= 1
        self._refs[block] += 1

    def register(self, block: int, identity: bytes) -> None:
        """Cache a referenced block's computed KV under its identity (the first block with it stays)."""
        if identity not in self._block_of and block not in self._identity_of:
            self._block_of[identity], self._identity_of[block] = block, identity

    def clear_cache(self) -> None:
        """Forget every cached identity; blocks in use stay with their requests."""
        while self._evictable:
            self._evict()
        self._block_of.clear()
        self._identity_of.clear()

    def _evict(self) -> None:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._identity_of.pop(block)]
        self._is_free[block] = True


def first_run(mask: np.ndarray, n: int) -> int | None:
    """Index of the first run of `n` True entries in `mask`, or None."""
    true_before = np.concatenate(([0], np.cumsum(mask)))
    runs = np.flatnonzero(true_before[n:] - true_before[:-n] == n)
    return int(runs[0]) if len(runs) else None


class Placed(NamedTuple):
    first_group: int
    tables: list[list[int]]  # block table per spanned group
    cached_tokens: int  # leading positions whose KV the tables already hold


class KVPlacement:
    """Rank 0's book of the blocks of every KVP group, and of where a request's KV goes (`layout`).

    Admission reserves the blocks of the prompt in every group it spans; decoding takes one block at
    a time from the group its new position falls in.
    """

    def __init__(self, layout: KVPLayout, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.layout, self.grid, self.prefix_caching = layout, BlockGrid(layout, block_size), prefix_caching
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

    def reserve(self, num_tokens: int, max_len: int, identities: list[bytes] = ()) -> Placed | None:
        """Blocks for the first `num_tokens` positions of a request that may grow to `max_len`, or None
        while no run of groups has room. Where the groups of a run hold cached blocks of the request's
        first blocks (`identities`, see `prefix_cache`), it takes them and leaves their positions out of
        the prefill; at least the last position is always computed, for its logits. Picks the run that
        spares most prefill, then the one with the most free blocks, which spreads short requests."""
        shards = self.layout.shard_tokens(num_tokens)
        span = len(self.layout.shard_tokens(max_len))
        best, best_key = None, None
        for first in range(len(self.allocators) - span + 1):
            hits = self._hits(first, identities, num_tokens)
            groups = [self.allocators[first + i] for i in range(len(shards))]
            if all(
                g.blocks_for(n) - len(hit) <= g.num_free - sum(map(g.is_evictable, hit))
                for g, n, hit in zip(groups, shards, hits)
            ):
                cached = self._cached_tokens(hits)
                key = (cached, min(self.headroom(first + i) for i in range(span)))
                if best_key is None or key > best_key:
                    best, best_key = (first, hits, cached), key
        if best is None:
            return None
        first, hits, cached = best
        tables = []
        for i, (n, hit, grown) in enumerate(zip(shards, hits, self._shard_blocks(max_len))):
            group = self.allocators[first + i]
            for block in hit:
                group.share(block)
            blocks = group.blocks_for(n)
            tables.append(hit + group.take(blocks - len(hit), after=hit[-1] if hit else None, room=grown - blocks))
        self._promise(first, tables, max_len, +1)
        return Placed(first, tables, cached)

    def _shard_blocks(self, max_len: int) -> list[int]:
        """Blocks of each shard of a request grown to `max_len`."""
        return [self.allocators[0].blocks_for(n) for n in self.layout.shard_tokens(max_len)]

    def _hits(self, first: int, identities: list[bytes], num_tokens: int) -> list[list[int]]:
        """Per shard of a request placed from group `first`, its cached blocks that lead its first
        blocks, ending before its last position."""
        hits = [[] for _ in self.layout.shard_tokens(num_tokens)]
        for k, identity in enumerate(identities):
            shard, _ = self.grid.shard_and_index(k)
            if self.grid.end(k) >= num_tokens or (block := self.allocators[first + shard].lookup(identity)) is None:
                break
            hits[shard].append(block)
        return hits

    def cached_prefix(self, identities: list[bytes], num_tokens: int) -> int:
        """Tokens of a request's first `num_tokens` that placing it now would find cached."""
        span = len(self.layout.shard_tokens(num_tokens))
        runs = range(len(self.allocators) - span + 1)
        return max((self._cached_tokens(self._hits(first, identities, num_tokens)) for first in runs), default=0)

    def _cached_tokens(self, hits: list[list[int]]) -> int:
        """Positions covered by a request's leading cached blocks (as `_hits` finds them)."""
        count = sum(map(len, hits))
        return self.grid.end(count - 1) if count else 0

    def register(self, first_group: int, tables: list[list[int]], identities: list[bytes], blocks: range) -> None:
        """Cache the request's blocks `blocks` (their KV computed in every stage) under their identities."""
        for k in blocks:
            shard, index = self.grid.shard_and_index(k)
            self.allocators[first_group + shard].register(tables[shard][index], identities[k])

    def clear_cache(self) -> None:
        for allocator in self.allocators:
            allocator.clear_cache()

    def headroom(self, group: int) -> int:
        """Free blocks of a group that no placed request may still claim."""
        return self.allocators[group].num_free - self.promised[group]

    def _promise(self, first_group: int, tables: list[list[int]], max_len: int, sign: int) -> None:
        for i, grown in enumerate(self._shard_blocks(max_len)):
            held = len(tables[i]) if i < len(tables) else 0
            self.promised[first_group + i] += sign * (grown - held)

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
        for i, (table, grown) in enumerate(zip(tables, self._shard_blocks(max_len))):
            self.allocators[first_group + i].free(table, room=grown - len(table))


class KVCache:
    """K and V of this rank's layers and KV heads: `[layers, kv_heads, num_blocks × block_size, head_dim]`.

    A token's slot is `block_id × block_size + offset`; a head's keys are rows of one matrix, which
    is the layout the attention kernels read.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
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
        return first, block_table[first : (end - 1) // self.block_size + 1]

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
            runs.append(
                (int(blocks[begin]) * bs + position - (first + begin) * bs, min(end, (first + stop) * bs) - position)
            )
        return runs

    def index(self, block_table: list[int], start: int, end: int) -> torch.Tensor | slice:
        """Slots of positions [start, end) as a slice when their blocks are consecutive (attention then
        reads the cache in place, and the cost does not grow with the context), else as a tensor."""
        if len(runs := self.runs(block_table, start, end)) == 1:
            return slice(runs[0][0], runs[0][0] + runs[0][1])
        return self.slots(block_table, start, end)
