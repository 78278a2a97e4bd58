"""Sequence pipeline parallelism: exact against transformers and one rank, and really pipelined."""

from __future__ import annotations

import random

import pytest

from mnemosyne_hpc.distributed.mesh import stage_layers
from models import DECODE_STEPS, assert_matches_reference, prompts, reference_greedy
from ranks import greedy_cases, run_engine, tiny_overrides, together_and_solo_cases


def test_stage_layers_are_balanced_and_cover_the_model():
    for layers, stages in [(5, 2), (5, 3), (30, 4), (30, 7), (3, 3)]:
        split = [stage_layers(layers, stages, s) for s in range(stages)]
        assert [i for r in split for i in r] == list(range(layers))
        assert max(map(len, split)) - min(map(len, split)) <= 1
    with pytest.raises(ValueError, match="exceeds"):
        stage_layers(2, 3, 0)


@pytest.mark.parametrize(
    "family, tp, spp, pipeline",
    [
        ("llama", 1, 2, "spp"),
        ("llama", 1, 3, "spp"),
        ("qwen2", 1, 3, "spp"),
        ("llama", 2, 2, "spp"),
        ("llama", 1, 2, "plain"),
    ],
)
def test_pipeline_matches_transformers(family, tp, spp, pipeline, deep_tiny_models, reference, tmp_path):
    model_dir = deep_tiny_models[family]
    hf = reference(model_dir)
    batch = prompts(hf.config.vocab_size)
    cases = greedy_cases(batch, (7, 0), DECODE_STEPS)
    overrides = tiny_overrides(model_dir, **{"parallel.tp": tp, "parallel.spp": spp, "scheduler.pipeline": pipeline})
    results = run_engine(tmp_path, tp * spp, overrides, cases)
    for index, prompt in enumerate(batch):
        ref_tokens, ref_logits = reference_greedy(hf, prompt, DECODE_STEPS)
        for case in cases:
            output = results[case["name"]]["outputs"][index]
            label = f"{family} tp={tp} spp={spp} {pipeline} {case['name']} prompt {index}"
            assert_matches_reference(output, ref_tokens, ref_logits, label)


def overlapping_ticks(stage_requests: list[list[list[int]]]) -> int:
    """Ticks in which one request has chunks in two pipeline stages at once."""
    return sum(any(len(set(a) & set(b)) for a in stages for b in stages if a is not b) for stages in stage_requests)


@pytest.mark.parametrize("pipeline", ["spp", "plain"])
def test_long_prefill_beside_decodes_equals_solo_runs(pipeline, deep_tiny_models, tmp_path):
    rng = random.Random(3)
    long = {"prompt_token_ids": [rng.randrange(2, 250) for _ in range(300)], "max_tokens": 8, "arrival_step": 4}
    short = [
        {"prompt_token_ids": [rng.randrange(2, 250) for _ in range(12)], "max_tokens": 40, "arrival_step": i}
        for i in range(3)
    ]
    requests = short + [long]
    cases = together_and_solo_cases("together", 32, requests)
    overrides = tiny_overrides(deep_tiny_models["llama"], **{"parallel.spp": 2, "scheduler.pipeline": pipeline})
    results = run_engine(tmp_path, 2, overrides, cases)
    together = results["together"]
    for i, output in enumerate(together["outputs"]):
        assert output["token_ids"] == results[f"solo{i}"]["outputs"][0]["token_ids"], f"request {i}"
    overlaps = overlapping_ticks(together["stage_requests"])
    if pipeline == "spp":
        assert overlaps >= 8, "the long prompt's chunks never filled both stages at once"
    else:
        assert overlaps == 0
    # the three short requests decode in two interleaved micro-batches, not all in one
    decodes_per_tick = [sum(p == "decode" for p in phases.values()) for phases in together["step_phases"]]
    assert max(decodes_per_tick) == 2
