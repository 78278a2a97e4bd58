"""A real model, a real long prompt: Qwen2.5-Coder-0.5B-Instruct finds a pass key in a 4k-token
prompt with its KV split over two KVP groups, token for token as transformers does (bench/needle.py
records the same at 8k tokens: about four minutes here, a fifth of the default test run's budget)."""

from __future__ import annotations

import json
import subprocess
import sys

from ranks import ROOT


def test_needle_at_4k_tokens_with_kvp2_matches_transformers(tmp_path):
    command = [
        sys.executable,
        "bench/needle.py",
        "--tokens",
        "4096",
        "--kvp",
        "2",
        "--results",
        str(tmp_path),
        "--workdir",
        str(tmp_path / "work"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads(next(tmp_path.glob("needle_*.json")).read_text())
    assert record["prompt_tokens"] > 4000 and record["kvp"] == 2
    assert record["tokens_per_kvp_group"] < record["prompt_tokens"]  # the prompt's KV spans both groups
    assert record["engine_token_ids"] == record["reference_token_ids"]
    assert str(record["pass_key"]) in record["engine_text"]
