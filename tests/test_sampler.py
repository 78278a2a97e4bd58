"""Sampling at extreme settings: finite probabilities for any valid temperature and top_p, and a row
whose sampling fails ends only its own request."""

from __future__ import annotations

import pytest
import torch

from mnemosyne_hpc.config import SamplingConfig
from mnemosyne_hpc.engine.request import RequestError, SamplingParams
from mnemosyne_hpc.engine.sampler import FAILED, _filter, sample


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-45},
        {"temperature": 1e-300},
        {"temperature": 5e-324},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 2.0, "top_k": 1},
    ],
)
def test_limits_of_temperature_and_top_p_sample_the_most_likely_token(fields):
    logits = torch.randn(3, 1000)
    params = [SamplingParams.from_request(SamplingConfig(), {**fields, "seed": i}) for i in range(3)]
    assert sample(logits, params, [7, 8, 9]) == logits.argmax(dim=-1).tolist()


def test_a_huge_temperature_samples_almost_uniformly():
    logits = torch.randn(1, 50)
    params = SamplingParams.from_request(SamplingConfig(), {"temperature": 1e300, "seed": 1})
    drawn = {sample(logits, [params], [position])[0] for position in range(400)}
    assert len(drawn) > 40


def test_a_row_whose_sampling_fails_is_marked_and_the_others_are_sampled():
    logits = torch.randn(3, 100)
    logits[1] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2), SamplingParams()]
    tokens = sample(logits, params, [0, 0, 0])
    assert tokens[1] == FAILED and tokens[2] == int(logits[2].argmax()) and 0 <= tokens[0] < 100


@pytest.mark.parametrize(
    "fields",
    [{"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": 10**400}, {"top_p": float("nan")}],
)
def test_values_outside_a_floats_range_are_refused(fields):
    with pytest.raises(RequestError):
        SamplingParams.from_request(SamplingConfig(), fields)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(_filter(logits, top_k=2, top_p=1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(_filter(logits, top_k=0, top_p=0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(_filter(logits, top_k=0, top_p=0.5)).tolist() == [True, False, False, False]


def test_seeded_sampling_depends_only_on_seed_and_position_and_greedy_is_argmax():
    logits = torch.randn(1, 1000)

    def draw(seed):
        return [sample(logits, [SamplingParams(temperature=1.0, seed=seed)], [position])[0] for position in range(10)]

    first = draw(5)
    assert first == draw(5) and len(set(first)) > 1  # same seed, same stream; the stream does vary
    assert draw(6) != first
    assert sample(logits, [SamplingParams()], [3]) == [int(logits.argmax())]
