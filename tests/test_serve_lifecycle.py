"""The server's life around its requests, on 2 ranks (TP=2: every step needs both) with a tiny random
model that reads and writes SmolLM2's tokens, so that it starts in seconds: SIGTERM stops every rank
with status 0 and a message whatever the server is doing, lets requests in flight finish within
server.shutdown_grace_s and ends the rest with an error; /health turns 503 while a rank is frozen; a
stream cut by a lost rank ends with an error event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mnemosyne_hpc.serving.loop import ENDED, REFUSED
from models import make_tiny_text_model
from ranks import MPIRUN, ROOT, free_port, tiny_overrides
from servers import kill_job, metric, rank_pids, start_server

WINDOW = 4096  # the model's max_position_embeddings: cache.max_model_len=0 takes it
LONG = {"prompt": "Once upon a time", "max_tokens": 3500, "ignore_eos": True}  # tens of seconds of decoding
MEDIUM = {**LONG, "max_tokens": 500}
STOPPED = (  # what the ranks say on a clean stop
    "[rank 0] SIGTERM: refusing new requests",
    "[rank 0] stopped serving",
    "[rank 1] rank 0 shut the job down",
)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return make_tiny_text_model(tmp_path_factory.mktemp("text") / "llama", max_position_embeddings=WINDOW)


def overrides(model_dir, **extra) -> list[str]:
    values = {
        "parallel.tp": 2,
        "cache.max_model_len": 0,
        "cache.num_blocks": 256,
        "scheduler.chunk_size": 8,  # a long prompt prefills over hundreds of steps
        "parallel.timeout_s": 30,
        **extra,
    }
    return tiny_overrides(model_dir, **values)


class Background(threading.Thread):
    """`function(*args)` on its own thread, keeping its result or its exception."""

    def __init__(self, function, *args):
        super().__init__(daemon=True)
        self.function, self.args, self.result, self.error = function, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.function(*self.args)
        except Exception as e:  # noqa: BLE001 - given back to the test by outcome()
            self.error = e

    def outcome(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"{self.function.__name__} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def stream(address: str, body: dict, started: threading.Event) -> list[tuple[float, str]]:
    """A streamed completion's events (arrival time, data), to its end; `started` is set at the first."""
    events = []
    with httpx.stream("POST", f"{address}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append((time.monotonic(), line[5:].strip()))
                started.set()
    return events


def streaming(address: str, body: dict) -> Background:
    """A stream in the background, once its first event has arrived."""
    started = threading.Event()
    client = Background(stream, address, body, started)
    assert started.wait(120), client.outcome(0)
    return client


def final_error(events: list[tuple[float, str]]) -> dict:
    """The error a stream ended with: its last event before [DONE]."""
    assert events[-1][1] == "[DONE]", events[-3:]
    return json.loads(events[-2][1])["error"]


def health(address: str) -> httpx.Response:
    return httpx.get(f"{address}/health", timeout=30)


def wait_for_health(address: str, status: int, seconds: float) -> tuple[float, httpx.Response]:
    deadline = time.monotonic() + seconds
    while (response := health(address)).status_code != status:
        assert time.monotonic() < deadline, f"/health still {response.status_code}: {response.text}"
        time.sleep(0.1)
    return time.monotonic(), response


def stop_cleanly(process, rank0: int) -> str:
    """SIGTERM to rank 0; every rank exits 0 and says so. The job's output."""
    os.kill(rank0, signal.SIGTERM)
    output = process.communicate(timeout=90)[0]
    assert process.returncode == 0 and all(line in output for line in STOPPED), output[-3000:]
    return output


def stop_once(directory, model_dir, state: str) -> None:
    """Start a server with no grace period, bring it to `state` (idle, a stream decoding, a long prompt
    prefilling), stop it; a request in flight gets its final error."""
    address, process = start_server(directory, overrides(model_dir, **{"server.shutdown_grace_s": 0}))
    try:
        client = None
        if state == "stream":
            client = streaming(address, LONG)
        elif state == "prefill":
            prompt = {"prompt": [1000 + i % 3000 for i in range(WINDOW - 100)], "max_tokens": 4}
            client = Background(lambda: httpx.post(f"{address}/v1/completions", json=prompt, timeout=120))
            while not metric(address, "mnemosyne_running_requests"):
                assert client.is_alive(), client.outcome(0).text
                time.sleep(0.05)
            assert metric(address, "mnemosyne_ttft_seconds_count") == 0  # no token yet: prefilling
        stop_cleanly(process, rank_pids(process.pid)[0])
    finally:
        kill_job(process)
    if state == "stream":
        assert final_error(client.outcome(60)) == {"message": ENDED, "type": "server_error", "code": 503}
    elif state == "prefill":
        response = client.outcome(60)
        assert response.status_code == 503 and response.json()["error"]["message"] == ENDED, response.text


@pytest.mark.parametrize("state", ["idle", "stream", "prefill"])
def test_sigterm_stops_every_rank_cleanly(state, text_model, tmp_path):
    stop_once(tmp_path, text_model, state)


def test_sigterm_while_starting_stops_every_rank_cleanly(text_model, tmp_path):
    """SIGTERM to rank 0 while it waits for rank 1 to join (held stopped): kept until every rank is up,
    then every rank exits 0 without serving."""
    command = [MPIRUN, "-n", "2", sys.executable, "-m", "mnemosyne_hpc.serve", *overrides(text_model)]
    command += ["server.port=0", f"server.address_file={tmp_path / 'address'}"]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # not through MPI: rank 0 goes on alone
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **rendezvous},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    reader = Background(lambda: lines.extend(process.stdout))
    try:
        deadline = time.monotonic() + 60
        while len(ranks := rank_pids(process.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(ranks[1], signal.SIGSTOP)
        while not any(line.startswith("[rank 0] waiting for 2 ranks") for line in lines):  # the rendezvous
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        os.kill(ranks[0], signal.SIGTERM)
        time.sleep(0.5)
        os.kill(ranks[1], signal.SIGCONT)
        process.wait(timeout=90)
        reader.join(timeout=10)
        output = "".join(lines)
    finally:
        kill_job(process)
    assert process.returncode == 0, output[-3000:]
    assert "[rank 0] SIGTERM while starting: every rank stops once up" in output
    assert "[rank 0] stopped while starting: not serving" in output and STOPPED[-1] in output
    assert not (tmp_path / "address").exists()


@pytest.mark.slow  # 20 server starts
def test_twenty_stops_in_a_row_all_clean(text_model, tmp_path):
    states = ["idle", "stream", "prefill"]
    for i in range(20):
        started = time.monotonic()
        (tmp_path / str(i)).mkdir()
        stop_once(tmp_path / str(i), text_model, states[i % 3])
        print(f"stop {i + 1} ({states[i % 3]}): clean, {time.monotonic() - started:.1f} s from start to exit")


def test_sigterm_lets_requests_in_flight_finish_within_the_grace_period_then_ends_them(text_model, tmp_path):
    grace = 5
    address, process = start_server(tmp_path, overrides(text_model, **{"server.shutdown_grace_s": grace}))
    try:
        long = streaming(address, LONG)
        short = streaming(address, {"prompt": "Hello", "max_tokens": 150, "ignore_eos": True})
        rank0 = rank_pids(process.pid)[0]
        os.kill(rank0, signal.SIGTERM)
        signalled = time.monotonic()
        refused = httpx.post(f"{address}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        unhealthy = health(address)
        long_events, short_events = long.outcome(60), short.outcome(60)
        output = process.communicate(timeout=90)[0]
    finally:
        kill_job(process)
    assert refused.status_code == 503 and refused.json()["error"]["message"] == REFUSED, refused.text
    assert unhealthy.status_code == 503 and unhealthy.json()["status"] == "stopping"
    finished = json.loads(short_events[-2][1])["choices"][0]
    assert short_events[-1][1] == "[DONE]" and finished["finish_reason"] == "length"
    assert short_events[-1][0] > signalled  # it was in flight, and finished during the grace period
    ended_after = long_events[-1][0] - signalled
    decoded_after = sum(1 for t, _ in long_events[:-2] if t > signalled + 1)
    print(
        f"short stream finished {short_events[-1][0] - signalled:.2f} s after SIGTERM; the long one decoded "
        f"{decoded_after} more tokens after 1 s and ended {ended_after:.2f} s after it (grace {grace} s)"
    )
    assert final_error(long_events) == {"message": ENDED, "type": "server_error", "code": 503}
    assert decoded_after > 0 and grace - 0.5 < ended_after < grace + 5
    assert process.returncode == 0 and all(line in output for line in STOPPED), output[-3000:]


def test_health_turns_503_while_a_rank_is_frozen_and_200_once_it_runs_again(text_model, tmp_path):
    stall_s = 2
    address, process = start_server(tmp_path, overrides(text_model, **{"server.health_stall_s": stall_s}))
    try:
        rank0, follower = rank_pids(process.pid)
        client = streaming(address, MEDIUM)
        assert health(address).json() == {"status": "ok"}
        os.kill(follower, signal.SIGSTOP)  # alive but silent: the stream stops moving
        frozen = time.monotonic()
        turned, unhealthy = wait_for_health(address, 503, 30)
        os.kill(follower, signal.SIGCONT)
        resumed = time.monotonic()
        back, healthy = wait_for_health(address, 200, 30)
        print(
            f"/health: 503 {turned - frozen:.2f} s after SIGSTOP (knob {stall_s} s), 200 {back - resumed:.2f} s "
            f"after SIGCONT: {unhealthy.json()['message']}"
        )
        assert unhealthy.json()["status"] == "stalled" and "no engine step has completed" in unhealthy.text
        assert stall_s - 0.5 < turned - frozen < stall_s + 3 and back - resumed < 3
        events = client.outcome(120)
        assert events[-1][1] == "[DONE]" and json.loads(events[-2][1])["choices"][0]["finish_reason"] == "length"
        stop_cleanly(process, rank0)
    finally:
        kill_job(process)


def test_a_stream_cut_by_a_lost_rank_ends_with_an_error_event(text_model, tmp_path):
    timeout_s = 8
    address, process = start_server(tmp_path, overrides(text_model, **{"parallel.timeout_s": timeout_s}))
    follower = rank_pids(process.pid)[1]
    try:
        client = streaming(address, LONG)
        os.kill(follower, signal.SIGSTOP)  # silent: rank 0's next collective gives up after parallel.timeout_s
        error = final_error(client.outcome(timeout_s + 60))
    finally:
        os.kill(follower, signal.SIGCONT)
        output = process.communicate(timeout=60)[0]
    print(f"the stream's last event: {error}")
    assert error["code"] == 500 and error["message"].startswith("the server failed and stops"), error
    assert process.returncode != 0 and "lost contact with a peer rank" in output, output[-3000:]


# The server, and after runtime._leave, on each rank: how many of the objects that hold process groups
# survived collection.
SURVIVORS = """
import gc, json, sys
import mnemosyne_hpc.runtime as runtime
import mnemosyne_hpc.serve as serve
leave = runtime._leave
def counted():
    leave()
    names = ("ParallelContext", "TensorParallel", "ModelRunner", "DeviceMesh")
    print("survivors", json.dumps({n: sum(type(o).__name__ == n for o in gc.get_objects()) for n in names}))
runtime._leave = counted
serve.main(sys.argv[1:])
"""


def test_a_stopped_rank_lets_its_process_groups_go_before_the_interpreter_exits(text_model, tmp_path):
    """A gloo worker that releases its last collective's tensors during interpreter shutdown aborts the
    process ("terminate called without an active exception"): the groups must be destroyed, their workers
    joined, while the interpreter runs; nothing of a rank (mesh, layers, model) may outlive runtime._leave,
    though the web framework's caches keep the server's handlers and, through them, the engine."""
    address, process = start_server(tmp_path, overrides(text_model), program=("-c", SURVIVORS))
    try:
        httpx.post(f"{address}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        output = stop_cleanly(process, rank_pids(process.pid)[0])
    finally:
        kill_job(process)
    survivors = [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("survivors ")]
    print(survivors)
    assert survivors == [dict.fromkeys(("ParallelContext", "TensorParallel", "ModelRunner", "DeviceMesh"), 0)] * 2
