"""The paged KV cache (engine/kv_cache.py): the block pool, and a block table's slots, slices and runs."""

from __future__ import annotations

import pytest
import torch

from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.kv_cache import BlockAllocator, KVCache, KVPlacement


def test_block_pool_reserves_and_frees():
    pool = BlockAllocator(num_blocks=4, block_size=16)
    a = pool.reserve(33)  # 3 blocks
    assert len(a) == 3 and pool.num_free == 1 and not pool.can_reserve(17)
    with pytest.raises(MemoryError):
        pool.reserve(40)
    pool.free(a)
    assert pool.num_free == 4 and pool.can_reserve(64)


def test_block_pool_hands_out_consecutive_blocks_where_it_can():
    pool = BlockAllocator(num_blocks=12, block_size=16)
    a, b, c = pool.reserve(32), pool.reserve(16), pool.reserve(48)  # [0, 1], [2], [3, 4, 5]
    pool.free(a)
    pool.free(c)  # free: 0, 1, 3, 4, 5, 6 … 11
    assert pool.reserve(64) == [3, 4, 5, 6]  # the first run long enough, not the lowest blocks
    assert pool.reserve(16, after=6) == [7]  # growth continues right after the sequence's last block
    assert pool.reserve(16, after=2) == [0]  # block 3 is taken: the first free one
    assert pool.reserve(80) == [1, 8, 9, 10, 11]  # no run of 5 is left: the lowest free blocks
    assert pool.num_free == 0 and b == [2]


def test_room_to_grow_is_held_open_until_nothing_else_fits():
    pool = BlockAllocator(num_blocks=8, block_size=16)
    a, b = pool.take(2, room=2), pool.take(1, room=1)  # 2, 3 held open for a, 5 for b
    assert (a, b) == ([0, 1], [4])
    assert pool.take(1, after=a[-1]) == [2]  # a grows into its room
    assert pool.take(2) == [6, 7]  # the first blocks nobody's growth holds
    assert pool.take(1) == [3]  # only held blocks are left: they go
    assert pool.take(1, after=b[-1]) == [5]


def test_freeing_a_sequence_opens_the_room_held_for_it():
    pool = BlockAllocator(num_blocks=6, block_size=16)
    a = pool.take(1, room=2)  # [0], 1 and 2 held open
    assert pool.take(1) == [3]
    pool.free(a, room=2)
    assert pool.take(2) == [0, 1]


def test_interleaved_requests_grow_in_one_run_each():
    """Two requests admitted one after the other, then decoding in turn: each one's KV stays one run, so
    decode attention reads it in place."""
    placement = KVPlacement(KVPLayout(num_groups=1, group_tokens=1024), num_blocks=16, block_size=16)
    requests = [(placement.reserve(20, 100), 100), (placement.reserve(40, 90), 90)]
    for position in range(40, 100):
        for (first, tables, _), max_len in requests:
            if position < max_len and not placement.covers(tables, position):
                assert placement.extend(first, tables, position)
    requests = [placed for placed, _ in requests]
    for _, (table,), _ in requests:
        assert table == list(range(table[0], table[0] + len(table)))
    assert [len(t) for _, (t,), _ in requests] == [7, 6]


def test_slots_follow_the_block_table():
    cache = KVCache(1, 1, 4, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.slots([5, 2], 2, 7).tolist() == [22, 23, 8, 9, 10]
    assert cache.slots([5, 2, 7], 6, 10).tolist() == [10, 11, 28, 29]  # starting in a later block


def test_consecutive_blocks_give_a_slice():
    cache = KVCache(1, 1, 4, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.index([2, 3, 4], 1, 10) == slice(9, 18)
    assert cache.index([7, 2, 3, 4], 5, 10) == slice(9, 14)
    assert cache.index([5, 2], 2, 7).tolist() == [22, 23, 8, 9, 10]
    for table, start, end in [([2, 3, 4], 1, 10), ([7, 2, 3, 4], 5, 10), ([6, 7], 0, 8)]:
        assert list(range(8 * 4))[cache.index(table, start, end)] == cache.slots(table, start, end).tolist()


def test_runs_of_consecutive_blocks_cover_the_slots_in_order():
    cache = KVCache(1, 1, 4, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.runs([2, 3, 4], 1, 10) == [(9, 9)]
    assert cache.runs([1, 2, 6, 0, 1], 3, 18) == [(7, 5), (24, 4), (0, 6)]
    for table, start, end in [([5, 2], 2, 7), ([1, 2, 6, 0, 1], 3, 18), ([7, 2, 3, 4], 5, 10), ([3, 1], 4, 5)]:
        slots = [slot for first, n in cache.runs(table, start, end) for slot in range(first, first + n)]
        assert slots == cache.slots(table, start, end).tolist()
