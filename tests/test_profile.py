"""The performance model, profiled on this machine: it is stored, reports its held-out error, and
drives adaptive chunking so that a long prompt's chunks shrink as its prefix grows."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from mnemosyne_hpc.model.backend import FEW_ROWS
from mnemosyne_hpc.perf.model import PerfModel
from models import make_tiny_model
from ranks import run_ranks, tiny_overrides
from simulation import Simulation


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("long") / "llama", max_position_embeddings=16384)


@pytest.mark.slow  # calibrates this machine twice (1 and 2 ranks)
@pytest.mark.parametrize("layout", [{}, {"parallel.kvp": 2}])
def test_profile_of_this_machine_drives_adaptive_chunking(layout, long_context_model, tmp_path):
    ranks = layout.get("parallel.kvp", 1)
    stored = tmp_path / "profile.json"
    overrides = tiny_overrides(
        long_context_model,
        **{
            "cache.max_model_len": 16384,
            "cache.num_blocks": 2048,
            "scheduler.max_num_batched_tokens": 4096,
            "scheduler.profile": stored,
            **layout,
        },
    )
    result = run_ranks(ranks, ["-m", "mnemosyne_hpc.profile", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"held-out median \|error\| ([\d.]+)% \(p90 [\d.]+%\) over (\d+) shapes", result.stdout)
    assert printed, result.stdout
    model = PerfModel.load(stored)
    assert model.report["layout"]["kvp"] == ranks and int(printed[2]) == model.report["held_out_steps"] == 24
    assert abs(float(printed[1]) - 100 * model.report["median_abs_error"]) < 0.1
    assert (model.merge is not None) == (ranks > 1) and isinstance(model.report["implausible_weights"], dict)
    # the wake after idle: the median ratio of 8 shapes' ticks after a pause and back to back, as printed
    woken = [step["after_idle_s"] / step["back_to_back_s"] for step in model.report["wake_steps"]]
    assert len(woken) == 8 and model.wake == statistics.median(woken) and model.wake_after_s == 0.5
    assert re.search(rf"a step after 0.5 s idle takes {model.wake:.2f}× as long", result.stdout), result.stdout
    # under KVP some whole steps run sequences whose KV spans both groups (16384 / 2 tokens each), so the
    # merge's weight is fitted to steps that merge
    group_tokens = 16384 // ranks
    spanning = [n for step in model.report["calibration"] for _, n, _ in step["sequences"] if n >= group_tokens]
    assert bool(spanning) == (ranks > 1) and set(model.weights) >= {"merge", "linear"}
    # every token count the few-row kernels take (tiles make the time uneven between powers of two), then
    # powers of two up to the largest step; the LM head's rows up to max_num_seqs (16)
    assert model.linear.x[:FEW_ROWS] == list(range(1, FEW_ROWS + 1))
    assert model.linear.x[FEW_ROWS:] == [512, 1024, 2048, 4096]
    assert model.lm_head.x == list(range(1, 17))
    assert ranks == 1 or model.merge.x == [2**i for i in range(12)] + [4096]  # collectives: powers of two
    largest_query = model.attention.queries[-1]
    assert model.attention(largest_query, 12000) > model.attention(largest_query, 0)  # attention grows with context
    assert largest_query == 4096 and json.loads(stored.read_text())["attention"]["contexts"][-1]["x"][-1] > 4096

    decode_step = model.batch_time([], 0) or model.prefill_time(1)
    sim = Simulation(
        perf_model=model,
        chunking="adaptive",
        tbt_slo_ms=1000 * 4 * decode_step,
        priority="fcfs",
        min_chunk=8,
        chunk_step=8,
    )
    long = sim.add(16000)
    sim.run_until(lambda: long.token_times)
    chunks = sim.chunks_of(long)[:-1]  # the last one is what is left of the prompt
    assert chunks[0] >= 4 * chunks[-1], f"chunks did not shrink: {chunks}"
    late, early = chunks[len(chunks) // 2 :], chunks[: len(chunks) // 2]
    assert max(late) <= min(early), f"chunks did not shrink: {chunks}"


def test_weights_beyond_the_plausible_are_flagged():
    """A profile whose kernels were timed in a slow spell fits weights far from 1 to its whole steps: those
    are named (and the profile taken again); weights within the plausible range, or never fitted, are not."""
    from mnemosyne_hpc.perf.calibrate import implausible_weights
    from mnemosyne_hpc.perf.model import AttentionFit, Curve

    def model(**weights):
        line = Curve([0.0, 1.0], [0.0, 1.0])
        return PerfModel("m", 2, 1, line, AttentionFit([1.0], [line]), line, weights=weights)

    assert implausible_weights(model(linear=0.7, decode_attention=1.3)) == {}
    assert implausible_weights(model(linear=0.0, decode_attention=0.316, lm_head=2.5)) == {
        "linear": 0.0,
        "decode_attention": 0.316,
        "lm_head": 2.5,
    }


def test_each_kernel_is_timed_after_the_caches_are_evicted():
    """The profiler's kernels are timed in turn, each after `before` (the probes' cache eviction) has run:
    never two timed calls back to back, where the second would find the first one's data cached."""
    from mnemosyne_hpc.perf.timing import median_times

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("linear", "lm_head")}
    median_times(fns, repeats=3, before=lambda: calls.append("evict"))
    warm_up, timed = calls[:2], calls[2:]
    assert warm_up == ["linear", "lm_head"]
    assert timed == ["evict", "linear", "evict", "lm_head"] * 3
