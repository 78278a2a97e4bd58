"""Defaults a user expects: the checkpoint's dtype (bfloat16 where the CPU computes in it) and the
model's window as cache.max_model_len, bounded by the KV pool and said at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mnemosyne_hpc import auto_config
from mnemosyne_hpc.auto_config import BF16_UNITS, auto_dtype, checkpoint_dtype, model_len, settle
from mnemosyne_hpc.config import compose, resolve_cache_dir
from mnemosyne_hpc.kernels.build import cpu_flags
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.model.gguf import convert_gguf
from models import make_tiny_model
from ranks import run_ranks, tiny_overrides

CPU = torch.device("cpu")


def test_the_defaults_are_left_to_the_model():
    cfg = compose([])
    assert cfg.model.dtype == "auto" and cfg.cache.max_model_len == 0


@pytest.mark.parametrize(
    "config, dtype",
    [
        ({"torch_dtype": "bfloat16"}, "bfloat16"),
        ({"dtype": "float16"}, "float16"),
        ({}, "float32"),
        ({"dtype": "float32", "gguf_weights": "Q4_1"}, "quantized Q4_1"),  # a converted GGUF file
        ({"dtype": "float32", "gguf_weights": "F16"}, "float16"),
    ],
)
def test_checkpoint_dtype_is_what_config_json_names(config, dtype, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(tmp_path) == dtype


@pytest.mark.parametrize(
    "saved, flags, chosen",
    [
        ("bfloat16", {"avx512f", "amx_bf16"}, "bfloat16"),
        ("bfloat16", {"avx512f", "avx512_bf16"}, "bfloat16"),
        ("bfloat16", {"avx512f", "avx2"}, "float32"),  # no bf16 units: float32 is faster
        ("float16", {"amx_bf16"}, "bfloat16"),
        ("float32", {"amx_bf16"}, "float32"),
        ("quantized Q4_1", {"avx512f", "avx512_bf16"}, "bfloat16"),
        ("quantized Q4_1", {"avx512f", "avx2"}, "float32"),
    ],
)
def test_auto_dtype_on_a_cpu(saved, flags, chosen, monkeypatch):
    monkeypatch.setattr(auto_config, "cpu_flags", lambda: flags)
    assert auto_dtype(saved, CPU) == chosen


@pytest.fixture(scope="module")
def args(tiny_models) -> ModelArgs:
    return ModelArgs.from_dir(tiny_models["llama"])  # a window of 512 positions


@pytest.mark.parametrize(
    "overrides, kv_blocks, length, why",
    [
        ([], 64, 512, "the model's window"),  # 64 blocks of 16 tokens hold 1024
        ([], 16, 256, "what one request can hold in the KV pool (16 blocks of 16 tokens per rank, 1 KVP"),
        (["parallel.kvp=2"], 16, 512, "the model's window"),  # two groups of 256 tokens
        (["parallel.kvp=2", "parallel.max_tokens_per_kvp_group=128"], 64, 256, "what one request can hold"),
        (["cache.max_model_len=300"], 1, 300, "as configured"),
    ],
)
def test_max_model_len(overrides, kv_blocks, length, why, args):
    chosen, reason = model_len(compose(["cache.block_size=16", *overrides]), args, kv_blocks)
    assert chosen == length and reason.startswith(why), reason


def test_a_max_model_len_beyond_the_window_is_refused(args):
    with pytest.raises(ValueError, match="cache.max_model_len = 1024 exceeds the model's window"):
        model_len(compose(["cache.max_model_len=1024"]), args, 1000)


def test_settle_says_what_it_chose(args, tiny_models, monkeypatch):
    monkeypatch.setattr(auto_config, "cpu_flags", lambda: {"amx_bf16"})
    settled, notes = settle(compose([]), args, tiny_models["llama"], CPU, lambda dtype: 100)
    assert settled.model.dtype == "float32" and settled.cache.max_model_len == 512
    assert notes == [
        "model.dtype=auto: float32 (the checkpoint is float32; cpu)",
        "cache.max_model_len=0: 512 (the model's window, max_position_embeddings)",
    ]


def test_a_run_takes_the_checkpoint_dtype_and_the_model_window_and_says_so(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 5}) + "\n")
    job = ["-m", "mnemosyne_hpc.generate", "generate.input=" + str(prompts), "generate.output=" + str(out)]
    result = run_ranks(1, [*job, *tiny_overrides(model_dir, **{"cache.max_model_len": 0})], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dtype = "bfloat16" if cpu_flags() & BF16_UNITS else "float32"
    assert f"[rank 0] model.dtype=auto: {dtype} (the checkpoint is bfloat16; cpu)" in result.stderr
    assert "[rank 0] cache.max_model_len=0: 512 (the model's window, max_position_embeddings)" in result.stderr
    assert len(json.loads(out.read_text())["token_ids"]) == 5

    refused = run_ranks(1, [*job, *tiny_overrides(model_dir, **{"cache.max_model_len": 1024})], timeout=300)
    assert refused.returncode != 0
    assert "cache.max_model_len = 1024 exceeds the model's window (max_position_embeddings = 512)" in refused.stderr


def test_the_embedded_gguf_model_is_a_quantized_checkpoint():
    """Most of its weights are Q4_1 (its float32 conversion keeps that): auto runs it as half precision."""
    cfg = compose([])
    assert checkpoint_dtype(convert_gguf(Path(cfg.model.path), resolve_cache_dir(cfg))) == "quantized Q4_1"
