"""A missing or dying rank ends every rank with a non-zero exit and a message; nothing hangs."""

from __future__ import annotations

import signal
import time

import pytest

from ranks import free_port, long_job, start_rank, wait_for_progress_bar

TIMEOUT_S = 8


def test_rank_that_never_arrives(tiny_models, tmp_path):
    started = time.monotonic()
    log = tmp_path / "rank0.err"
    rank0 = start_rank(0, 2, free_port(), long_job(tiny_models, tmp_path, TIMEOUT_S), log)
    rank0.wait(timeout=TIMEOUT_S + 60)
    stderr = log.read_text()
    assert rank0.returncode != 0
    assert "a rank never arrived" in stderr and f"within {TIMEOUT_S}s" in stderr, stderr[-2000:]
    assert time.monotonic() - started < TIMEOUT_S + 45


@pytest.mark.parametrize("victim, signal_number", [(0, signal.SIGKILL), (1, signal.SIGKILL), (1, signal.SIGSTOP)])
def test_rank_that_dies_or_hangs_mid_run(victim, signal_number, tiny_models, tmp_path):
    port, args = free_port(), long_job(tiny_models, tmp_path, TIMEOUT_S)
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
