"""Bad input gets a clear error; in a batch only the bad request is lost."""

from __future__ import annotations

import json

import pytest

from mnemosyne_hpc.config import ConfigError, SamplingConfig, compose
from mnemosyne_hpc.engine.request import RequestError, SamplingParams
from ranks import MPIRUN, ROOT, run_ranks, tiny_overrides

GOOD = {"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 5}


def test_batch_reports_bad_requests_and_completes_the_rest(tiny_models, tmp_path):
    lines = [
        json.dumps(GOOD),
        json.dumps({"prompt_token_ids": list(range(2, 200)) * 3}),  # 594 tokens > max_model_len 512
        json.dumps({"prompt_token_ids": []}),
        json.dumps({"prompt": "text but no tokenizer"}),
        json.dumps({**GOOD, "temperature": -1}),
        json.dumps({**GOOD, "top_p": 0}),
        json.dumps({**GOOD, "max_tokens": 0}),
        json.dumps({**GOOD, "colour": "blue"}),
        json.dumps({"prompt_token_ids": [5, 99999]}),
        "{not json",
        json.dumps({**GOOD, "max_tokens": 3, "seed": 3, "temperature": 1.0}),
    ]
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    result = run_ranks(
        2,
        [
            "-m",
            "mnemosyne_hpc.generate",
            *tiny_overrides(
                tiny_models["llama"], **{"parallel.tp": 2, "generate.input": prompts, "generate.output": out}
            ),
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in results] == list(range(len(lines)))
    expected_errors = {
        1: "max_model_len",
        2: "empty prompt",
        3: "no tokenizer",
        4: "temperature",
        5: "top_p",
        6: "max_tokens",
        7: "unknown sampling field(s): colour",
        8: "outside the vocabulary",
        9: "malformed JSON",
    }
    for index, message in expected_errors.items():
        assert message in results[index].get("error", ""), (index, results[index])
    assert len(results[0]["token_ids"]) == 5 and len(results[10]["token_ids"]) == 3
    assert "9 rejected" in result.stderr


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_sampling_values(fields, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams.from_request(SamplingConfig(), fields)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["colour=blue"], "Could not override 'colour'"),
        (["model=hf"], "model.path is required with model=hf"),
        (["+colour=blue"], "Key 'colour' not in"),
        (["parallel.tp=two"], "parallel.tp"),
        (["scheduler.chunk_size=-1"], "chunk_size"),
        (["model=nope"], "Could not find 'model/nope'"),
        (
            ["parallel.kvp=2", "parallel.max_tokens_per_kvp_group=1000", "cache.max_model_len=4096"],
            "max_tokens_per_kvp_group = 1000 is too small",
        ),
        (["parallel.max_tokens_per_kvp_group=-1"], "max_tokens_per_kvp_group"),
        (["scheduler.chunking=dynamic"], "scheduler.chunking must be 'adaptive' or 'fixed'"),
        (["scheduler.priority=sjf"], "scheduler.priority must be 'lars', 'edf' or 'fcfs'"),
        (["scheduler.tbt_slo_ms=0"], "tbt_slo_ms must be > 0"),
        (["scheduler.min_chunk=64", "scheduler.max_chunk=32"], "min_chunk <= max_chunk"),
        (["scheduler.space_share=1"], "space_share must be in"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_unknown_config_key_exits_with_message():
    result = run_ranks(2, ["-m", "mnemosyne_hpc.generate", "colour=blue"], timeout=120)
    assert result.returncode != 0
    assert "Could not override 'colour'" in result.stderr


@pytest.mark.parametrize("problem", ["missing", "no_config", "bad_config", "no_weights", "wrong_shapes"])
def test_bad_model_directory(problem, tiny_models, tmp_path):
    model_dir = tmp_path / "model"
    if problem != "missing":
        model_dir.mkdir()
        source = tiny_models["llama"]
        if problem == "bad_config":
            (model_dir / "config.json").write_text("{ this is not json")
        elif problem != "no_config":
            (model_dir / "config.json").write_text((source / "config.json").read_text())
        if problem == "wrong_shapes":
            config = json.loads((source / "config.json").read_text())
            (model_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
            (model_dir / "model.safetensors").symlink_to(source / "model.safetensors")
    result = run_ranks(
        2, ["-m", "mnemosyne_hpc.generate", *tiny_overrides(model_dir, **{"parallel.tp": 2})], timeout=120
    )
    assert result.returncode != 0
    expected = {
        "missing": "does not exist",
        "no_config": "no config.json",
        "bad_config": "bad config.json",
        "no_weights": "no *.safetensors",
        "wrong_shapes": "checkpoint gives shape",
    }[problem]
    assert expected in result.stderr, result.stderr[-2000:]


def test_head_count_must_divide_by_tp(tiny_models):
    result = run_ranks(
        3, ["-m", "mnemosyne_hpc.generate", *tiny_overrides(tiny_models["llama"], **{"parallel.tp": 3})], timeout=120
    )
    assert result.returncode != 0
    assert "num_attention_heads = 8 is not divisible by parallel.tp = 3" in result.stderr


def test_world_size_must_match_layout(tiny_models):
    result = run_ranks(
        2, ["-m", "mnemosyne_hpc.generate", *tiny_overrides(tiny_models["llama"], **{"parallel.tp": 1})], timeout=120
    )
    assert result.returncode != 0
    assert "world size 2 != parallel.spp × parallel.kvp × parallel.tp" in result.stderr


def test_ranks_with_different_configs_refuse_to_start(tiny_models):
    import subprocess
    import sys

    base = ["-m", "mnemosyne_hpc.generate", *tiny_overrides(tiny_models["llama"], **{"parallel.tp": 2})]
    result = subprocess.run(
        [
            MPIRUN,
            "-n",
            "1",
            sys.executable,
            *base,
            "sampling.max_tokens=5",
            ":",
            "-n",
            "1",
            sys.executable,
            *base,
            "sampling.max_tokens=6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "composed a different config" in result.stderr
