"""Logits and greedy tokens equal Hugging Face transformers for every model family, chunk size and TP."""

from __future__ import annotations

import random

import pytest
import torch

from models import DECODE_STEPS, assert_matches_reference, make_tiny_model, prompts, reference_greedy
from ranks import greedy_cases, run_engine, tiny_overrides

CHUNK_SIZES = (1, 7, 64, 0)  # 0: the whole prompt in one chunk


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


def test_bf16_matches_transformers_on_its_own_tokens(reference, tmp_path):
    """The CPU fast path (bf16 weights and KV, AMX GEMMs, the decode kernel over a batch of decodes,
    a prompt spanning both KVP groups) against transformers in fp32 on the same bf16-rounded weights,
    fed the engine's own tokens: bf16 rounding is the only difference allowed."""
    model_dir = make_tiny_model(
        "llama",
        tmp_path / "model",
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        initializer_range=0.05,
    )
    rng = random.Random(7)
    batch = [[rng.randrange(2, 250) for _ in range(n)] for n in (300, 40, 170)]
    cases = greedy_cases(batch, [64], 12)
    overrides = tiny_overrides(model_dir, **{"model.dtype": "bfloat16", "parallel.kvp": 2})
    outputs = run_engine(tmp_path, 2, overrides, cases)["chunk64"]["outputs"]
    hf = reference(model_dir).to(torch.bfloat16).float()
    for prompt, output in zip(batch, outputs):
        tokens = prompt + output["token_ids"]
        with torch.no_grad():
            ref_logits = hf(torch.tensor([tokens[:-1]])).logits[0, len(prompt) - 1 :]
        error = (output["logits"] - ref_logits).abs().max().item()
        scale = ref_logits.abs().max().item()
        assert error <= 3e-2 * scale, f"max |Δlogit| = {error:.3e} > 3e-2 × {scale:.2f}"
