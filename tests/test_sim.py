"""The simulator decides as the engine does: a real run's request stream, replayed on the virtual clock
with that run's measured step times, gets the same chunks, in the same order, at the same steps."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from mnemosyne_hpc.config import compose
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.perf.model import AttentionFit, Curve, PerfModel
from mnemosyne_hpc.sim.simulator import Arrival, Simulator
from mnemosyne_hpc.sim.step_time import RecordedSteps
from models import make_tiny_model
from ranks import run_engine, tiny_overrides

# Steep enough that adaptive chunks shrink along a 300-token prompt under a 5 ms SLO: 1 ms per step,
# 20 µs per token of linear layers, attention 0.2 µs per query token per cached token.
STEEP = PerfModel(
    key="steep",
    layers=1,
    stages=1,
    linear=Curve([0, 1000], [0.0, 0.02]),
    attention=AttentionFit.linear([1, 1000], [0.0, 0.0], [2e-7, 2e-4]),
    lm_head=Curve([1], [0.0]),
    overhead_s=1e-3,
)

POLICIES = {
    "adaptive-lars": {"chunking": "adaptive", "priority": "lars", "tbt_slo_ms": 5.0},  # × stages
    "fixed-fcfs": {"chunking": "fixed", "priority": "fcfs", "chunk_size": 64},
}
# (prompt length, tokens to generate, step it arrives at): a long prompt that short ones overtake
STREAM = [(300, 6, 0), (97, 8, 2), (13, 8, 3), (130, 4, 6), (40, 4, 20)]


@pytest.mark.parametrize("layout", [{}, {"parallel.spp": 2}, {"parallel.kvp": 2}], ids=["1rank", "spp2", "kvp2"])
def test_replay_of_a_real_run_makes_the_same_decisions(layout, tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "llama")
    STEEP.save(tmp_path / "steep.json")
    overrides = tiny_overrides(
        model_dir,
        **{
            "scheduler.profile": tmp_path / "steep.json",
            "scheduler.chunking": "adaptive",
            "scheduler.priority": "lars",
            "cache.num_blocks": 64,
            **layout,
        },
    )
    prompts = [[2 + (i * 7 + j) % 200 for j in range(n)] for i, (n, _, _) in enumerate(STREAM)]
    requests = [
        {"prompt_token_ids": p, "max_tokens": m, "ignore_eos": True, "arrival_step": a}
        for p, (_, m, a) in zip(prompts, STREAM)
    ]
    stages = layout.get("parallel.spp", 1)  # each stage's share of the SLO is the same in every layout
    policies = {
        name: {k: v * stages if k == "tbt_slo_ms" else v for k, v in policy.items()}
        for name, policy in POLICIES.items()
    }
    cases = [{"name": name, "scheduler": policy, "requests": requests} for name, policy in policies.items()]
    runs = run_engine(tmp_path / "run", 1 + bool(layout), overrides, cases)

    cfg = compose(overrides)
    for name, policy in policies.items():
        run = runs[name]
        for key, value in policy.items():
            setattr(cfg.scheduler, key, value)
        starts = run["step_starts"]
        simulator = Simulator(
            cfg,
            ModelArgs.from_dir(model_dir),
            STEEP,
            step_time=RecordedSteps([b - a for a, b in itertools.pairwise(starts)]),
            start=starts[0],
        )
        result = simulator.run([Arrival(t, n, m) for t, (n, m, _) in zip(run["arrivals"], STREAM)])
        simulated = [[(i, n) for i, _, n in step] for step in result.steps]
        measured = [
            [(i, lengths[i]) for i in stages[0]] for lengths, stages in zip(run["chunk_lengths"], run["stage_requests"])
        ]
        prefills = [[n for n in result.chunks_of(i) if n > 1] for i in range(len(STREAM))]
        print(
            f"{name} {layout}: {len(measured)} steps; prefill chunks {prefills}; "
            f"simulated TTFT {[round(1000 * r['ttft_s'], 1) for r in result.records]} ms"
        )
        assert simulated == measured, f"{name}: the simulation's chunks differ from the engine's"
        assert all(r["finish_reason"] == "length" for r in result.records)
        if policy["chunking"] == "adaptive":  # the test is only as strong as the decisions it compares
            assert len(set(prefills[0])) > 2, prefills


def test_a_step_after_an_idle_spell_takes_the_wake_factor(tmp_path):
    """Each request arrives at an idle engine: its prefill step runs `wake` times as long where the idle
    spell reached `wake_after_s`, and its decodes, back to back, as long as ever."""
    model_dir = make_tiny_model("llama", tmp_path / "llama")
    cfg, args = compose(tiny_overrides(model_dir)), ModelArgs.from_dir(model_dir)
    arrivals = [Arrival(0.0, 40, 6), Arrival(10.0, 40, 6)]  # the first is long done when the second arrives

    def records(**wake) -> list[dict]:
        return Simulator(cfg, args, dataclasses.replace(STEEP, **wake)).run(arrivals).records

    awake, woken = records(), records(wake=2.0)
    late = records(wake=2.0, wake_after_s=20.0)  # only the first step, after an unbounded idle spell
    assert all(r["ttft_s"] > 0 and len(r["tbt_s"]) == 5 for r in awake)
    assert [r["ttft_s"] for r in woken] == pytest.approx([2 * r["ttft_s"] for r in awake])
    assert late[0]["ttft_s"] == pytest.approx(2 * awake[0]["ttft_s"])
    assert late[1]["ttft_s"] == pytest.approx(awake[1]["ttft_s"])
    assert [t for r in woken for t in r["tbt_s"]] == pytest.approx([t for r in awake for t in r["tbt_s"]])


def test_the_kv_pool_is_sized_as_the_engine_sizes_it(tmp_path):
    """Without cache.num_blocks the simulated pool holds what cache.kv_memory_gib holds in model.dtype, as
    a real engine's does: a request that fits it runs, one that does not is refused as the engine refuses
    it; with model.dtype=auto (the checkpoint's) the size is unknown, and said so."""
    model_dir = make_tiny_model("llama", tmp_path / "llama")
    args = ModelArgs.from_dir(model_dir)
    per_block = 2 * args.num_layers * args.num_kv_heads * args.head_dim * 16 * 4  # K and V, float32, 16 tokens

    def simulator(*overrides) -> Simulator:
        sized = [o for o in tiny_overrides(model_dir) if not o.startswith("cache.num_blocks")]
        return Simulator(compose([*sized, "cache.num_blocks=0", *overrides]), args, STEEP)

    five_blocks = f"cache.kv_memory_gib={5 * per_block / 2**30!r}"
    sim = simulator(five_blocks, "model.dtype=float32")
    assert sim.engine.runner.num_blocks == 5
    (record,) = sim.run([Arrival(0.0, 70, 4)]).records  # 74 tokens: 5 blocks of 16
    assert record["finish_reason"] == "length" and len(record["tbt_s"]) == 3
    with pytest.raises(Exception, match="kv_memory_gib"):
        simulator(five_blocks, "model.dtype=float32").run([Arrival(0.0, 90, 4)])  # 6 blocks
    assert simulator(five_blocks, "model.dtype=bfloat16").engine.runner.num_blocks == 10
    with pytest.raises(ValueError, match="model.dtype"):
        simulator(five_blocks)
