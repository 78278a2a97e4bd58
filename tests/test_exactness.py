"""Logits and greedy tokens equal Hugging Face transformers for every model family, chunk size and TP."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import greedy_cases, run_engine, tiny_overrides

PROMPT_LENGTHS = (97, 13, 130)
DECODE_STEPS = 64
CHUNK_SIZES = (1, 7, 64, 0)  # 0: the whole prompt in one chunk


def prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with transformers, recomputing the whole sequence each step."""
    tokens, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([tokens])).logits[0, -1].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
    return tokens[len(prompt):], torch.stack(logits)


def assert_matches_reference(output: dict, ref_tokens: list[int], ref_logits: torch.Tensor, label: str) -> None:
    logits = output["logits"]
    assert logits.shape == ref_logits.shape, label
    error = (logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    assert error <= 1e-3 * scale, f"{label}: max |Δlogit| = {error:.2e} > 1e-3 × {scale:.2f}"
    assert output["token_ids"] == ref_tokens, f"{label}: greedy tokens differ"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_matches_transformers(family, tp, tiny_models, reference, tmp_path):
    model_dir = tiny_models[family]
    hf = reference(model_dir)
    batch = prompts(hf.config.vocab_size)
    cases = greedy_cases(batch, CHUNK_SIZES, DECODE_STEPS)
    results = run_engine(tmp_path, tp, tiny_overrides(model_dir, **{"parallel.tp": tp}), cases)
    for index, prompt in enumerate(batch):
        ref_tokens, ref_logits = reference_greedy(hf, prompt, DECODE_STEPS)
        for case in cases:
            output = results[case["name"]]["outputs"][index]
            assert_matches_reference(output, ref_tokens, ref_logits, f"{family} tp={tp} {case['name']} prompt {index}")
