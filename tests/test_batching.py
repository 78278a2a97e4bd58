"""Requests in different phases share steps and still get exactly their solo outputs."""

from __future__ import annotations

import random

import pytest
import torch

from ranks import run_engine, tiny_overrides, together_and_solo_cases


@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_step_equals_solo_runs(tp, tiny_models, tmp_path):
    rng = random.Random(7)
    requests = [  # a decode-phase request, a long prefill that arrives later, a short one later still
        {"prompt_token_ids": [rng.randrange(2, 250) for _ in range(20)], "max_tokens": 40, "arrival_step": 0},
        {"prompt_token_ids": [rng.randrange(2, 250) for _ in range(90)], "max_tokens": 12, "arrival_step": 3},
        {"prompt_token_ids": [rng.randrange(2, 250) for _ in range(30)], "max_tokens": 12, "arrival_step": 5},
        {
            "prompt_token_ids": [rng.randrange(2, 250) for _ in range(25)],
            "max_tokens": 20,
            "arrival_step": 5,
            "temperature": 0.9,
            "top_k": 50,
            "top_p": 0.9,
            "seed": 11,
        },
    ]
    cases = together_and_solo_cases("mixed", 16, requests)
    results = run_engine(tmp_path, tp, tiny_overrides(tiny_models["llama"], **{"parallel.tp": tp}), cases)

    mixed = results["mixed"]
    phase_mixes = [set(phases.values()) for phases in mixed["step_phases"]]
    assert {"first-chunk", "next-chunk", "decode"} in phase_mixes, "no step mixed requests in three phases"
    for i, output in enumerate(mixed["outputs"]):
        solo = results[f"solo{i}"]["outputs"][0]
        assert output["token_ids"] == solo["token_ids"], f"request {i} differs from its solo run"
        assert torch.allclose(output["logits"], solo["logits"], atol=1e-4, rtol=0)
