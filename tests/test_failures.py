"""A missing or dying rank ends every rank with a non-zero exit and a message; nothing hangs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ranks import ROOT, tiny_overrides

TIMEOUT_S = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank: int, world: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One rank, started torchrun-style (RANK/WORLD_SIZE/MASTER_*), so a test can kill it alone."""
    env = {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "mnemosyne_hpc.generate", *args],
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


def long_job(tiny_models, tmp_path) -> list[str]:
    prompts = tmp_path / "in.jsonl"
    request = json.dumps({"prompt_token_ids": [3] * 50, "max_tokens": 400, "ignore_eos": True})
    prompts.write_text((request + "\n") * 100)  # one at a time: minutes of work
    return tiny_overrides(
        tiny_models["llama"],
        **{
            "parallel.tp": 2,
            "parallel.timeout_s": TIMEOUT_S,
            "scheduler.chunk_size": 1,
            "scheduler.max_num_seqs": 1,
            "generate.input": prompts,
            "generate.output": tmp_path / "out.jsonl",
        },
    )


def test_rank_that_never_arrives(tiny_models, tmp_path):
    started = time.monotonic()
    log = tmp_path / "rank0.err"
    rank0 = start_rank(0, 2, free_port(), long_job(tiny_models, tmp_path), log)
    rank0.wait(timeout=TIMEOUT_S + 60)
    stderr = log.read_text()
    assert rank0.returncode != 0
    assert "a rank never arrived" in stderr and f"within {TIMEOUT_S}s" in stderr, stderr[-2000:]
    assert time.monotonic() - started < TIMEOUT_S + 45


@pytest.mark.parametrize("victim, signal_number", [(0, signal.SIGKILL), (1, signal.SIGKILL), (1, signal.SIGSTOP)])
def test_rank_that_dies_or_hangs_mid_run(victim, signal_number, tiny_models, tmp_path):
    port, args = free_port(), long_job(tiny_models, tmp_path)
    logs = [tmp_path / f"rank{r}.err" for r in range(2)]
    ranks = [start_rank(r, 2, port, args, logs[r]) for r in range(2)]
    wait_for_progress_bar(ranks[0], logs[0], timeout=90)
    time.sleep(1.0)
    ranks[victim].send_signal(signal_number)  # SIGSTOP: alive but silent, so only the timeout can tell
    survivor = ranks[1 - victim]
    survivor.wait(timeout=TIMEOUT_S + 60)
    ranks[victim].kill()
    ranks[victim].wait()
    stderr = logs[1 - victim].read_text()
    assert survivor.returncode not in (0, None)
    assert "lost contact with a peer rank" in stderr, stderr[-2000:]
