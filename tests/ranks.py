"""Running ranks from the tests: `mpirun` of this environment, the tiny models' overrides, and the
engine worker (tests/engine_worker.py) with its cases."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
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


GROUP_TOKENS = 80  # L: small, so short prompts cross several group boundaries


def kvp_prompts(kvp: int, vocab_size: int) -> list[list[int]]:
    """A 50-token prompt whose decode crosses the first boundary, and prompts crossing 1 … kvp−1
    boundaries during prefill; every request fits the kvp · L positions."""
    rng = random.Random(kvp)
    lengths = [50] + [j * GROUP_TOKENS + 10 for j in range(1, kvp)]
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def kvp_overrides(model_dir, tp: int, spp: int, kvp: int, max_model_len: int) -> list[str]:
    """With kvp == 1 the one group holds everything (L automatic)."""
    return tiny_overrides(
        model_dir,
        **{
            "parallel.tp": tp,
            "parallel.spp": spp,
            "parallel.kvp": kvp,
            "parallel.max_tokens_per_kvp_group": GROUP_TOKENS if kvp > 1 else 0,
            "cache.max_model_len": max_model_len,
        },
    )


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


def engine_job(directory: Path, overrides: list[str], cases: list[dict]) -> tuple[list[str], Path]:
    """The engine worker's command line for these cases, and where rank 0 will save the results."""
    directory.mkdir(parents=True, exist_ok=True)
    spec, out = directory / "spec.json", directory / "out.pt"
    spec.write_text(json.dumps({"overrides": overrides, "cases": cases}))
    return [str(ROOT / "tests" / "engine_worker.py"), str(spec), str(out)], out


def run_engine(tmp_path: Path, n: int, overrides: list[str], cases: list[dict], launch=None) -> dict:
    """The cases on `n` ranks started by `launch(n, args)` (default: `mpirun -n n python ARGS…` here)."""
    args, out = engine_job(tmp_path, overrides, cases)
    result = (launch or run_ranks)(n, args)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(
    rank: int, world: int, port: int, args: list[str], log: Path, master: str = "127.0.0.1", on=lambda argv: argv
) -> subprocess.Popen:
    """One rank of `python -m mnemosyne_hpc.generate ARGS`, started torchrun-style (RANK/WORLD_SIZE/MASTER_*),
    so a test can kill it alone; `on(argv)` is the command that runs argv where the rank should run."""
    env = {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
    }
    with open(log, "w") as stderr:
        return subprocess.Popen(
            on([sys.executable, "-m", "mnemosyne_hpc.generate", *args]),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def wait_for_progress_bar(process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Rank 0 draws its progress bar once generation runs."""
    deadline = time.monotonic() + timeout
    while "requests:" not in log.read_text():
        assert time.monotonic() < deadline and process.poll() is None, f"never started: {log.read_text()[-2000:]}"
        time.sleep(0.1)


def long_job(tiny_models, tmp_path: Path, timeout_s: float) -> list[str]:
    """Minutes of generation on TP=2 that fails within `timeout_s` when a rank is lost."""
    prompts = tmp_path / "in.jsonl"
    request = json.dumps({"prompt_token_ids": [3] * 50, "max_tokens": 400, "ignore_eos": True})
    prompts.write_text((request + "\n") * 100)  # one at a time: minutes of work
    return tiny_overrides(
        tiny_models["llama"],
        **{
            "parallel.tp": 2,
            "parallel.timeout_s": timeout_s,
            "scheduler.chunk_size": 1,
            "scheduler.max_num_seqs": 1,
            "generate.input": prompts,
            "generate.output": tmp_path / "out.jsonl",
        },
    )
