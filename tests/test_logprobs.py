"""Log-probabilities of output and prompt tokens equal log_softmax of transformers' logits, at one rank
and split by TP, SPP and KVP."""

from __future__ import annotations

import random

import pytest
import torch

from ranks import GROUP_TOKENS, kvp_overrides, run_engine

TOP = 5
DECODE_STEPS = 12


def requests(vocab_size: int) -> list[dict]:
    """Greedy and sampled requests; prompts that cross KVP group boundaries (GROUP_TOKENS) and, the last
    one, more rows than the engine turns into logits at once."""
    rng = random.Random(5)
    lengths, wants = (
        (50, 95, 150, 9),
        ({"logprobs": TOP, "prompt_logprobs": 2}, {"logprobs": 0}, {"prompt_logprobs": TOP}),
    )
    return [
        {
            "prompt_token_ids": [rng.randrange(2, vocab_size) for _ in range(n)],
            "max_tokens": DECODE_STEPS,
            "ignore_eos": True,
            **({"temperature": 0.9, "seed": i} if i % 2 else {}),
            **wants[i % len(wants)],
        }
        for i, n in enumerate(lengths)
    ]


def assert_logprob(found, ref_row: torch.Tensor, token: int, top: int, label: str) -> None:
    """`found` (a TokenLogprob as a dict) against the reference log-probabilities `ref_row` [vocab] at its position."""
    assert found["token_id"] == token, label
    assert abs(found["logprob"] - ref_row[token].item()) <= 1e-4, (
        f"{label}: {found['logprob']} vs {ref_row[token].item()}"
    )
    assert len(found["top"]) == top, label
    values = torch.tensor([lp for _, lp in found["top"]], dtype=torch.float64)
    assert torch.allclose(values, ref_row.topk(top).values, atol=1e-4), label
    assert all(abs(ref_row[i].item() - lp) <= 1e-4 for i, lp in found["top"]), label  # the ids hold those values
    assert values.tolist() == sorted(values.tolist(), reverse=True), label


@pytest.mark.parametrize("tp, spp, kvp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_logprobs_match_transformers(tp, spp, kvp, tiny_models, reference, tmp_path):
    model_dir = tiny_models["llama"]
    hf = reference(model_dir)
    batch = requests(hf.config.vocab_size)
    cases = [{"name": f"chunk{c}", "chunk_size": c, "requests": batch} for c in (7, 0)]
    overrides = kvp_overrides(model_dir, tp, spp, kvp, 2 * GROUP_TOKENS if kvp > 1 else 512)
    if kvp == 1:
        batch.append({**batch[0], "prompt_token_ids": batch[0]["prompt_token_ids"] * 6})  # 300 prompt rows
    results = run_engine(tmp_path, tp * spp * kvp, overrides, cases)
    for case in cases:
        for index, request in enumerate(batch):
            label = f"tp×spp×kvp={tp}×{spp}×{kvp} {case['name']} request {index}"
            output = results[case["name"]]["outputs"][index]
            prompt = request["prompt_token_ids"]
            tokens = prompt + output["token_ids"]
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([tokens[:-1]])).logits[0].double(), dim=-1)
            if request.get("logprobs") is None:
                assert output["logprobs"] == [], label
            else:
                assert len(output["logprobs"]) == DECODE_STEPS, label
                for step, found in enumerate(output["logprobs"]):
                    position = len(prompt) + step
                    assert_logprob(
                        found, ref[position - 1], tokens[position], request["logprobs"], f"{label} output {step}"
                    )
            if request.get("prompt_logprobs") is None:
                assert output["prompt_logprobs"] == [], label
            else:
                assert len(output["prompt_logprobs"]) == len(prompt) and output["prompt_logprobs"][0] is None, label
                for position in range(1, len(prompt)):
                    found = output["prompt_logprobs"][position]
                    assert_logprob(
                        found,
                        ref[position - 1],
                        prompt[position],
                        request["prompt_logprobs"],
                        f"{label} prompt {position}",
                    )


def test_prompt_logprobs_are_computed_when_the_prefix_cache_holds_the_prompt(tiny_models, reference, tmp_path):
    model_dir = tiny_models["llama"]
    hf = reference(model_dir)
    prompt = requests(hf.config.vocab_size)[1]["prompt_token_ids"]
    plain = {"prompt_token_ids": prompt, "max_tokens": 2}
    cases = [
        {"name": "first", "requests": [plain]},
        {
            "name": "again",
            "warm_prefix_cache": True,
            "requests": [plain, {**plain, "prompt_logprobs": 1, "arrival_step": 1}],
        },
    ]
    overrides = kvp_overrides(model_dir, 1, 1, 1, 512) + ["cache.prefix_caching=true"]
    again = run_engine(tmp_path, 1, overrides, cases)["again"]["outputs"]
    assert again[0]["cached_tokens"] > 0 and again[1]["cached_tokens"] == 0
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1)
    for position in range(1, len(prompt)):
        assert_logprob(
            again[1]["prompt_logprobs"][position], ref[position - 1], prompt[position], 1, f"prompt {position}"
        )
