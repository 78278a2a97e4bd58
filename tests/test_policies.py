"""End to end on real ranks: every scheduling policy gives the exact outputs, and memory pressure
is met by preemption and recompute, with nothing lost."""

from __future__ import annotations

import random

import pytest

from mnemosyne_hpc.perf.model import PerfModel, SequenceShape
from models import assert_matches_reference, reference_greedy
from ranks import run_engine, run_ranks, tiny_overrides, together_and_solo_cases

POLICIES = [{"chunking": c, "priority": p} for c in ("adaptive", "fixed") for p in ("lars", "edf", "fcfs")]


@pytest.fixture(scope="module")
def policy_overrides(tiny_models, tmp_path_factory):
    """Adaptive chunking in steps of 8 tokens against an SLO that a 64-token chunk fills on this
    machine's profile of the model, so the chunks of a 300-token prompt vary in size."""
    profile = tmp_path_factory.mktemp("profile") / "tiny.json"
    base = tiny_overrides(tiny_models["llama"], **{"scheduler.profile": profile})
    result = run_ranks(1, ["-m", "mnemosyne_hpc.profile", *base])
    assert result.returncode == 0, result.stderr[-3000:]
    slo_ms = 1000 * PerfModel.load(profile).batch_time([SequenceShape(64, 0)], 0) / 0.9

    def overrides(model_dir, **extra):
        return tiny_overrides(
            model_dir,
            **{
                "scheduler.chunking": "adaptive",
                "scheduler.priority": "lars",
                "scheduler.profile": profile,
                "scheduler.tbt_slo_ms": slo_ms,
                "scheduler.slo_headroom": 0.1,
                "scheduler.min_chunk": 8,
                "scheduler.chunk_step": 8,
                **extra,
            },
        )

    return overrides


@pytest.mark.parametrize("kvp", [1, 2])
def test_every_policy_matches_transformers(kvp, policy_overrides, tiny_models, reference, tmp_path):
    model_dir = tiny_models["llama"]
    hf = reference(model_dir)
    rng = random.Random(5)
    prompts = [[rng.randrange(2, hf.config.vocab_size) for _ in range(n)] for n in (300, 13, 97, 40)]
    requests = [
        {"prompt_token_ids": p, "max_tokens": 24, "ignore_eos": True, "arrival_step": 2 * i}
        for i, p in enumerate(prompts)
    ]
    cases = [
        {"name": f"{p['chunking']}-{p['priority']}", "chunk_size": 32, "scheduler": p, "requests": requests}
        for p in POLICIES
    ]
    overrides = policy_overrides(model_dir, **{"parallel.kvp": kvp, "parallel.max_tokens_per_kvp_group": 512 // kvp})
    results = run_engine(tmp_path, kvp, overrides, cases)
    for index, prompt in enumerate(prompts):
        ref_tokens, ref_logits = reference_greedy(hf, prompt, 24)
        for case in cases:
            output = results[case["name"]]["outputs"][index]
            assert_matches_reference(output, ref_tokens, ref_logits, f"kvp={kvp} {case['name']} prompt {index}")
    lengths = {n for step in results["adaptive-lars"]["chunk_lengths"] for i, n in step.items() if i == 0}
    assert len(lengths) >= 3, f"adaptive chunking used too few chunk sizes for the long prompt: {lengths}"


@pytest.mark.parametrize("kvp", [1, 2])
def test_more_requests_than_kv_memory_all_complete(kvp, policy_overrides, tiny_models, tmp_path):
    rng = random.Random(9)
    requests = [
        {
            "prompt_token_ids": [rng.randrange(2, 250) for _ in range(rng.randint(20, 40))],
            "max_tokens": 48,
            "ignore_eos": True,
            "arrival_step": i // 3,
            **({"temperature": 0.8, "seed": i} if i % 3 == 0 else {}),
        }
        for i in range(9)
    ]
    # 8 blocks of 16 tokens per KVP group; each request grows to 68-88 tokens (5-6 blocks)
    overrides = policy_overrides(
        tiny_models["llama"],
        **{
            "cache.num_blocks": 8,
            "cache.max_model_len": 128,
            "parallel.kvp": kvp,
            "parallel.max_tokens_per_kvp_group": 128 // kvp,
        },
    )
    cases = together_and_solo_cases("together", 32, requests)
    results = run_engine(tmp_path, kvp, overrides, cases)
    together = results["together"]["outputs"]
    assert len(together) == len(requests)
    assert sum(o["preemptions"] for o in together) > 0, "memory never ran out: the test is too small"
    for i, output in enumerate(together):
        solo = results[f"solo{i}"]["outputs"][0]
        assert solo["preemptions"] == 0
        assert output["token_ids"] == solo["token_ids"], f"request {i} (preempted {output['preemptions']}×) differs"
