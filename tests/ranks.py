"""Running ranks from the tests: `mpirun` of this environment, the tiny models' overrides, and the
engine worker (tests/engine_worker.py) with its cases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def tiny_overrides(model_dir: Path, **extra) -> list[str]:
    values = {
        "model": "hf",
        "model.path": str(model_dir),
        "cache.block_size": 16,
        "cache.num_blocks": 128,
        "cache.max_model_len": 512,
        "scheduler.max_num_batched_tokens": 1024,
        "parallel.timeout_s": 60,
        "scheduler.chunking": "fixed",
        "scheduler.priority": "fcfs",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_ranks(n: int, args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpirun -n n python ARGS...` from the repository root."""
    return subprocess.run(
        [MPIRUN, "-n", str(n), sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def greedy_cases(prompts: list[list[int]], chunk_sizes, decode_steps: int) -> list[dict]:
    """One case per chunk size, each running every prompt greedily for `decode_steps` tokens."""
    return [
        {
            "name": f"chunk{c}",
            "chunk_size": c,
            "requests": [{"prompt_token_ids": p, "max_tokens": decode_steps, "ignore_eos": True} for p in prompts],
        }
        for c in chunk_sizes
    ]


def together_and_solo_cases(name: str, chunk_size: int, requests: list[dict]) -> list[dict]:
    """The requests together as case `name`, and each alone from step 0 as case `solo<i>`."""
    return [{"name": name, "chunk_size": chunk_size, "requests": requests}] + [
        {"name": f"solo{i}", "chunk_size": chunk_size, "requests": [{**r, "arrival_step": 0}]}
        for i, r in enumerate(requests)
    ]


def run_engine(tmp_path: Path, n: int, overrides: list[str], cases: list[dict]) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.pt"
    spec.write_text(json.dumps({"overrides": overrides, "cases": cases}))
    result = run_ranks(n, [str(ROOT / "tests" / "engine_worker.py"), str(spec), str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)
