"""Scheduling policies on synthetic queues, driven by a fake clock that advances by each step's
predicted time: deterministic, and independent of this machine's speed."""

from __future__ import annotations

import pytest

from mnemosyne_hpc.perf.model import SequenceShape
from simulation import SYNTHETIC, Simulation


@pytest.mark.parametrize("headroom", [0.0, 0.25])
def test_adaptive_chunks_fill_the_budget_and_shrink_as_the_prefix_grows(headroom):
    sim = Simulation(chunking="adaptive", tbt_slo_ms=40, priority="fcfs", slo_headroom=headroom)
    budget = 0.040 * (1 - headroom)
    long = sim.add(30_000)
    sim.run_until(lambda: long.token_times)
    chunks = sim.chunks_of(long)
    assert sum(chunks) == 30_000
    assert chunks == sorted(chunks, reverse=True), "a later chunk of the prompt was larger"
    assert chunks[0] >= 8 * chunks[-2] and all(c % 32 == 0 for c in chunks[:-1])
    for i, c in enumerate(chunks[:-1]):  # each is the largest that fits the budget: the next size up does not
        start = sum(chunks[:i])
        assert SYNTHETIC.batch_time([SequenceShape(c, start)], 0) <= budget
        assert c == 8192 or SYNTHETIC.batch_time([SequenceShape(c + 32, start)], 0) > budget


def test_decodes_first_and_the_prefill_takes_what_is_left_of_the_budget():
    sim = Simulation(chunking="adaptive", tbt_slo_ms=20, priority="fcfs")
    short = sim.add(100, max_tokens=200)
    sim.run_until(lambda: short.token_times)
    long = sim.add(50_000)
    sim.run_until(lambda: long.num_computed > 20_000)
    mixed = [s for s in sim.steps if short.id in s and long.id in s]
    assert mixed and all(s[short.id][1] == 1 for s in mixed)
    tbt = short.tbt_s
    assert max(tbt) <= 0.020 + 1e-9, f"a decode step took {max(tbt) * 1000:.1f} ms > 20 ms"


def test_fixed_chunking_ignores_the_budget():
    sim = Simulation(chunking="fixed", chunk_size=4096, tbt_slo_ms=20, priority="fcfs")
    long = sim.add(20_000)
    sim.run_until(lambda: long.token_times)
    assert sim.chunks_of(long) == [4096] * 4 + [20_000 - 4 * 4096]
    assert sim.now > 4 * 0.020, "steps of 4096 tokens cannot fit 20 ms on this synthetic model"


@pytest.mark.parametrize("priority", ["fcfs", "lars", "edf"])
def test_short_request_behind_a_long_prefill(priority):
    sim = Simulation(chunking="adaptive", tbt_slo_ms=50, priority=priority, space_share=0.0)
    long = sim.add(40_000)
    sim.run_until(lambda: sim.now > 0.2)
    short = sim.add(3000)  # its deadline: arrival + 0.5 s (min_deadline_ms)
    sim.run_until(lambda: long.token_times and short.token_times)
    if priority == "fcfs":  # arrival order: it only gets what each step's long chunk leaves over
        assert short.ttft_s > 0.5
    elif priority == "edf":  # its deadline is far earlier than the long one's: it goes at once
        assert short.ttft_s < 0.06
    else:  # LARS: it goes once its relative slack falls below the long one's, inside its deadline
        assert 0.06 < short.ttft_s < 0.5
    assert long.ttft_s < SYNTHETIC.prefill_time(40_000) * 1.1, "the long request starved"


def test_lars_space_sharing_keeps_the_long_prefill_going_beside_short_ones():
    sim = Simulation(chunking="adaptive", tbt_slo_ms=50, priority="lars", space_share=0.5)
    long = sim.add(40_000)
    sim.run_until(lambda: sim.now > 0.2)
    shorts = [sim.add(2000) for _ in range(3)]
    sim.run_until(lambda: all(s.token_times for s in shorts))
    shared = [s for s in sim.steps if long.id in s and any(r.id in s for r in shorts)]
    assert shared, "the long prefill never shared a step with the short ones"
    for step in shared:  # the long chunk alone fits half the step: it left the rest to the short ones
        start, size = step[long.id]
        assert SYNTHETIC.batch_time([SequenceShape(size, start)], 0) <= 0.025 + 1e-12
    assert not long.token_times, "the short ones should finish first"


def test_preemption_by_recompute_completes_every_request():
    # 12 blocks of 16 tokens; 6 requests that each grow to 16 + 40 tokens (4 blocks): 24 blocks wanted
    sim = Simulation(num_blocks=12, block_size=16, chunking="fixed", chunk_size=16, priority="lars")
    requests = [sim.add(16, max_tokens=40) for _ in range(6)]
    sim.run_until(lambda: len(sim.finished) == len(requests))
    assert sum(r.preemptions for r in requests) > 0, "memory never ran out: the test is too small"
    for r in requests:  # every token sampled exactly once per position, in order, none lost
        assert r.output_token_ids == list(range(16, 56)), f"request {r.id}: {r.output_token_ids}"
    assert sim.placement.allocators[0].num_free == 12 and sim.placement.promised == [0]


def test_admission_waits_for_memory_in_priority_order():
    sim = Simulation(num_blocks=8, block_size=16, chunking="fixed", chunk_size=64, priority="fcfs")
    big = sim.add(100, max_tokens=2)  # 7 blocks
    blocked = sim.add(64, max_tokens=2)  # 4 blocks: must wait for the first
    small = sim.add(8, max_tokens=2)  # would fit beside the first, but may not overtake the second
    sim.step()
    assert [r.id for r in sim.scheduler.running] == [big.id]
    sim.run_until(lambda: len(sim.finished) == 3)
    assert blocked.token_times[0] <= small.token_times[0]
