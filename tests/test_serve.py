"""The OpenAI-compatible server, on 2 ranks (KVP=2) with the embedded SmolLM2, through the openai
client and raw HTTP: answers, streaming, bad input, disconnects, 200 concurrent clients, idle time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from ranks import ROOT
from servers import metric as _metric
from servers import rank_pids as _rank_pids
from servers import start_server

KEY = "test-key"
TIMEOUT_S = 6  # parallel.timeout_s: the idle test waits twice as long


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    address, process = start_server(
        tmp_path_factory.mktemp("serve"),
        [
            "parallel.kvp=2",
            "cache.max_model_len=1024",
            "scheduler.chunking=fixed",
            "scheduler.priority=fcfs",
            "scheduler.max_num_seqs=64",
            f"parallel.timeout_s={TIMEOUT_S}",
            f"server.api_key={KEY}",
            f"server.max_request_bytes={8 << 20}",  # room for the long prompts that test tokenising
        ],
    )
    yield address, process
    os.kill(_rank_pids(process.pid)[0], signal.SIGTERM)  # a clean stop: rank 0 tells the others to shut down
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-3000:]


def client(address: str) -> OpenAI:
    return OpenAI(base_url=f"{address}/v1", api_key=KEY, max_retries=0)


def test_completion_chat_and_streaming(server):
    address, _ = server
    openai = client(address)
    model = openai.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    completion = openai.completions.create(model=model, prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text.startswith(" Paris")
    assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"
    streamed = openai.completions.create(model=model, prompt="The capital of France is", max_tokens=8, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = openai.chat.completions.create(model=model, messages=messages, max_tokens=12)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    chunks = list(openai.chat.completions.create(model=model, messages=messages, max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"prompt": 42}).encode(), 400, "prompt: not any of its accepted forms (text, or token ids"),
        (
            json.dumps({"prompt": "hi", "temperature": "hot"}).encode(),
            400,
            "temperature: Input should be a valid number",
        ),
        (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), 400, "max_tokens = 0 scores the prompt only"),
        (json.dumps({"prompt": "hi", "logprobs": 21}).encode(), 400, "logprobs: Input should be less than"),
        (json.dumps({"prompt": "hi", "model": "gpt-4"}).encode(), 404, "not found"),
        (json.dumps({"prompt": "hi " * 2000}).encode(), 400, "cache.max_model_len = 1024"),
        (json.dumps({"prompt": "hi", "frobnicate": 1}).encode(), 400, "frobnicate: Extra inputs are not permitted"),
        (json.dumps({"prompt": ["a", "b"]}).encode(), 400, "prompt: not any of its accepted forms"),
        (json.dumps({"prompt": "hi", "seed": 2**64}).encode(), 400, "seed: Input should be less than"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, body, status, message):
    address, _ = server
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    response = httpx.post(f"{address}/v1/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == status and message in response.json()["error"]["message"], response.text
    assert (
        client(address)
        .completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="Hi", max_tokens=2)
        .usage.completion_tokens
        == 2
    )


MODEL = "SmolLM2-135M-Instruct.Q4_1"
HEADERS = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("completions", json.dumps({"prompt": "abc \ud800 def"}).encode(), "lone UTF-16 surrogate"),
        (
            "chat/completions",
            json.dumps({"messages": [{"role": "user", "content": "abc \udfff"}]}).encode(),
            "lone UTF-16 surrogate",
        ),
        ("completions", DEEP, "nested too deeply"),
        ("chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        ("completions", b'{"prompt": "hi", "temperature": NaN}', "NaN is not a JSON value"),
        ("completions", b'{"prompt": "hi", "top_p": Infinity}', "Infinity is not a JSON value"),
        ("completions", json.dumps({"prompt": "hi", "temperature": 10**400}).encode(), "temperature"),
        ("completions", json.dumps({"prompt": "hi", "n": True}).encode(), "n: Input should be a valid integer"),
    ],
)
def test_bodies_that_once_ended_the_job_get_a_400_and_the_server_keeps_serving(server, path, body, message):
    address, process = server
    response = httpx.post(f"{address}/v1/{path}", content=body, headers=HEADERS, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    assert client(address).completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    assert process.poll() is None


@pytest.mark.parametrize(
    "sampling", [{"temperature": 1e-45}, {"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}]
)
def test_extreme_sampling_values_give_the_greedy_limit(server, sampling):
    address, process = server
    prompt = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6}
    greedy = httpx.post(f"{address}/v1/completions", json=prompt, headers=HEADERS, timeout=60)
    extreme = httpx.post(
        f"{address}/v1/completions", json={**prompt, **sampling, "seed": 3}, headers=HEADERS, timeout=60
    )
    assert extreme.status_code == 200, extreme.text
    assert extreme.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert process.poll() is None


def test_a_long_text_prompt_does_not_stall_a_running_stream(server):
    """The prompt's text is tokenised off the thread that drives the ranks, so the stream's tokens keep
    coming meanwhile. Measured here: 600k tokens in 2.2-2.8 s; a stream's largest gap meanwhile 132 ms
    (median 58 ms) against 2163 ms when the engine's thread tokenised."""
    address, process = server
    window = []

    def send_long_prompt():
        time.sleep(2)  # the stream is flowing
        window.append(time.monotonic())
        response = httpx.post(
            f"{address}/v1/completions",
            headers=HEADERS,
            timeout=120,
            json={"model": MODEL, "prompt": "word " * 600_000, "max_tokens": 1},
        )
        window.append(time.monotonic())
        window.append(response)

    sender = threading.Thread(target=send_long_prompt)
    sender.start()
    arrivals = []
    with httpx.stream(
        "POST",
        f"{address}/v1/completions",
        headers=HEADERS,
        timeout=120,
        json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True},
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
            if len(window) == 3 and arrivals[-1] > window[1] + 1:
                break
    sender.join()
    start, end, refused = window
    assert refused.status_code == 400 and "max_model_len" in refused.json()["error"]["message"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    before = sorted(b - a for a, b in zip(arrivals, arrivals[1:]) if b < start)
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > start and a < end]
    assert before and during and arrivals[-1] > end, (start, end, arrivals[0], arrivals[-1])
    typical = before[len(before) // 2]
    print(
        f"tokenised in {end - start:.2f} s; gaps before: median {1e3 * typical:.0f} ms; "
        f"during: max {1e3 * max(during):.0f} ms over {len(during)} gaps; all: max {1e3 * max(gaps):.0f} ms"
    )
    assert max(during) < max(0.5 * (end - start), 4 * typical), (end - start, typical, during)
    assert process.poll() is None


def test_eight_streams_keep_their_pace_while_a_200k_token_prompt_arrives(server, tmp_path):
    """bench/serve_stall.py against this server: the streams' TBT p99 with the long prompt arriving
    over that without it (bench/results/serve_stall.json has the measured ratio; the bound here is loose
    for a noisy machine)."""
    address, process = server
    run = subprocess.run(
        [sys.executable, "bench/serve_stall.py", "--address", address, "--api-key", KEY, "--max-tokens", "100"]
        + ["--rounds", "2", "--results", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    record = json.loads((tmp_path / "serve_stall.json").read_text())
    print(run.stdout[-1500:])
    assert all(arrival["status"] == 400 for arrival in record["long_prompt_arrivals"])
    # tokenising 200k tokens on the engine's thread (about 0.4 s) made the ratio several times over; a
    # machine shared with other jobs has moved it from 1.0 to 1.5
    assert record["ratios"]["tbt_p99_with_over_without"] <= 2.5, record
    assert process.poll() is None


HUGE = 10 << 20  # bytes: over the server's bound
CORPUS = [  # (path, body): every one a 4xx with a message
    ("completions", json.dumps({"prompt": "abc \ud800 def"}).encode()),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "abc \udfff"}]}).encode()),
    ("completions", DEEP),
    ("completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("completions", b'{"prompt": "hi", "top_p": -Infinity}'),
    ("completions", json.dumps({"prompt": "hi", "temperature": 10**400}).encode()),
    ("completions", json.dumps({"prompt": "hi", "n": True}).encode()),
    ("completions", json.dumps({"prompt": "hi", "stream": "yes"}).encode()),
    ("completions", json.dumps({"prompt": {"text": "hi"}}).encode()),
    ("chat/completions", json.dumps({"messages": "hi"}).encode()),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": None}]}).encode()),
    ("completions", json.dumps({"prompt": [-1, 2**70]}).encode()),
    ("completions", json.dumps({"prompt": "word " * 20_000}).encode()),  # 20k tokens: past the context
    ("completions", json.dumps({"prompt": "word " * (HUGE // 5)}).encode()),
    ("completions", json.dumps({"prompt": list(range(HUGE // 7))}).encode()),
    ("completions", None),  # HUGE bytes streamed without a length
]


def test_a_corpus_of_bad_requests_gets_4xx_answers_and_leaves_rank0_memory_where_it_was(server):
    """Each body of CORPUS, three times over: a 4xx with a message, the server serving after each; rank
    0's resident memory ends within 10% of where it was after a first pass."""
    address, process = server
    rank0 = psutil.Process(_rank_pids(process.pid)[0])
    openai = client(address)

    def bad_requests() -> None:
        for path, body in CORPUS:
            content = body if body is not None else (b"x" * (1 << 20) for _ in range(HUGE >> 20))
            response = httpx.post(f"{address}/v1/{path}", content=content, headers=HEADERS, timeout=120)
            assert 400 <= response.status_code < 500 and response.json()["error"]["message"], (path, response.text)
            assert openai.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2

    bad_requests()
    start = rank0.memory_info().rss
    for _ in range(3):
        bad_requests()
    end = rank0.memory_info().rss
    print(f"rank 0 resident: {start / 2**20:.0f} MiB after a first pass, {end / 2**20:.0f} MiB after three more")
    assert end <= 1.1 * start
    assert process.poll() is None


def test_api_key_is_required(server):
    address, _ = server
    response = httpx.post(f"{address}/v1/completions", json={"prompt": "hi"}, timeout=60)
    assert response.status_code == 401
    assert httpx.get(f"{address}/health", timeout=60).json() == {"status": "ok"}


def test_client_that_disconnects_mid_stream_frees_its_request(server):
    address, _ = server
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST",
        f"{address}/v1/completions",
        headers=headers,
        timeout=60,
        json={"prompt": "Once upon a time", "max_tokens": 900, "stream": True},
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    _wait_until_idle(address, 30)  # the request is aborted and its blocks freed, not run to 900 tokens
    assert _metric(address, 'mnemosyne_requests_total{finish_reason="abort"}') >= 1
    assert _metric(address, "mnemosyne_kv_blocks_used_ratio") == 0


def test_client_that_disconnects_before_a_whole_answer_frees_its_request(server):
    """Not streaming: the client leaves while its request decodes; it is aborted, not run to 1000 tokens."""
    address, _ = server
    aborted = _metric(address, ABORTED, default=0)
    _send_and_hang_up(
        address, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}, seconds=2
    )
    _wait_until_idle(address, 10)
    assert _metric(address, ABORTED) == aborted + 1
    assert _metric(address, "mnemosyne_kv_blocks_used_ratio") == 0


def test_client_that_disconnects_before_its_first_token_frees_its_request(server):
    """Streaming, a prompt of two prefill chunks: the client leaves during the first; the request is
    aborted before it produced a token (no TTFT observed), not when its first token would be sent."""
    address, _ = server
    aborted, first_tokens = _metric(address, ABORTED, default=0), _metric(address, "mnemosyne_ttft_seconds_count")
    _send_and_hang_up(
        address,
        {"model": MODEL, "prompt": [1000 + i % 500 for i in range(900)], "max_tokens": 8, "stream": True},
        seconds=0.2,
    )
    _wait_until_idle(address, 10)
    assert _metric(address, ABORTED) == aborted + 1
    assert _metric(address, "mnemosyne_ttft_seconds_count") == first_tokens


@pytest.mark.parametrize(
    "path, field",
    [("completions", "max_tokens"), ("chat/completions", "max_tokens"), ("chat/completions", "max_completion_tokens")],
)
def test_max_tokens_beyond_the_context_is_refused(server, path, field):
    """As vLLM's server: prompt + max_tokens > cache.max_model_len is a 400, not clipped."""
    address, _ = server
    prompt = {"prompt": [1000] * 24} if path == "completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    for max_tokens in (1001, 10**30):
        response = httpx.post(
            f"{address}/v1/{path}", headers=HEADERS, timeout=60, json={"model": MODEL, **prompt, field: max_tokens}
        )
        message = response.json()["error"]["message"]
        assert response.status_code == 400 and f"max_tokens is too large: {max_tokens}; cache.max_model_len" in message
        assert path != "completions" or max_tokens != 1001 or "(1001 > 1024 - 24)" in message
    if path == "completions":  # 24 + 1000 tokens fill the context: accepted (and dropped after its first token)
        with httpx.stream(
            "POST",
            f"{address}/v1/completions",
            headers=HEADERS,
            timeout=60,
            json={"model": MODEL, **prompt, "max_tokens": 1000, "stream": True},
        ) as response:
            assert response.status_code == 200 and next(line for line in response.iter_lines() if line)
        _wait_until_idle(address, 30)


def test_streamed_text_never_shows_part_of_a_stop_string(server):
    """A stop string that spans two tokens: what streams stops before it, as the whole answer does."""
    address, _ = server
    request = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12}
    pieces = _streamed(address, request)
    i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    whole = httpx.post(f"{address}/v1/completions", headers=HEADERS, timeout=60, json={**request, "stop": [stop]})
    expected = "".join(pieces)[: "".join(pieces).index(stop)]
    assert whole.json()["choices"][0]["text"] == expected and whole.json()["choices"][0]["finish_reason"] == "stop"
    assert "".join(_streamed(address, {**request, "stop": [stop]})) == expected, (stop, pieces)


ABORTED = 'mnemosyne_requests_total{finish_reason="abort"}'


def test_a_later_turn_reuses_the_cached_prefix_of_the_conversation(server):
    """A 600-token history (its blocks span both KVP groups: L = 512) asked two questions: the second
    finds the history's complete blocks cached; usage and /metrics say how many tokens."""
    address, _ = server
    openai = client(address)
    history = [
        {
            "role": "system",
            "content": " ".join(f"Fact {i}: the box number {i} holds {i * 7 % 13} marbles." for i in range(40)),
        }
    ]
    queried, hits = (_metric(address, f"mnemosyne_prefix_cache_{name}_tokens_total") for name in ("queries", "hits"))
    model = openai.models.list().data[0].id
    answers = [
        openai.chat.completions.create(
            model=model, max_tokens=4, messages=history + [{"role": "user", "content": question}]
        )
        for question in ("What does box 3 hold?", "And box 5?")
    ]
    first, second = (answer.usage for answer in answers)
    assert first.prompt_tokens > 600 and first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens >= 512  # every complete block of the history
    assert _metric(address, "mnemosyne_prefix_cache_queries_tokens_total") == (
        queried + first.prompt_tokens + second.prompt_tokens
    )
    assert _metric(address, "mnemosyne_prefix_cache_hits_tokens_total") == (
        hits + second.prompt_tokens_details.cached_tokens
    )


def _streamed(address: str, request: dict) -> list[str]:
    """The text of each event of a streamed completion."""
    with httpx.stream(
        "POST", f"{address}/v1/completions", headers=HEADERS, timeout=60, json={**request, "stream": True}
    ) as response:
        events = [
            json.loads(line[5:])
            for line in response.iter_lines()
            if line.startswith("data:") and line != "data: [DONE]"
        ]
    return [event["choices"][0]["text"] for event in events]


def _send_and_hang_up(address: str, body: dict, seconds: float) -> None:
    """POST a completion, wait `seconds`, close the connection without reading the answer."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(head.encode() + data)
        time.sleep(seconds)


def _wait_until_idle(address: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _metric(address, "mnemosyne_running_requests") or _metric(address, "mnemosyne_waiting_requests"):
        assert time.monotonic() < deadline, "a disconnected request is still running"
        time.sleep(0.2)


def test_200_concurrent_requests_are_all_answered(server):
    address, _ = server

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=300, limits=limits, headers={"authorization": f"Bearer {KEY}"}) as http:
            return await asyncio.gather(
                *[
                    http.post(f"{address}/v1/completions", json={"prompt": f"Count to {i}:", "max_tokens": 4})
                    for i in range(200)
                ]
            )

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 200
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in responses)


def test_idle_server_outlives_the_collective_timeout_without_spending_cpu(server):
    address, process = server
    ranks = _rank_pids(process.pid)
    assert len(ranks) == 2
    before = sum(_cpu_seconds(pid) for pid in ranks)
    time.sleep(2 * TIMEOUT_S)
    spent = sum(_cpu_seconds(pid) for pid in ranks) - before
    assert spent < 0.1 * 2 * TIMEOUT_S, f"idle ranks spent {spent:.2f} CPU-seconds in {2 * TIMEOUT_S} s"
    completion = client(address).completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="Hi", max_tokens=3)
    assert completion.usage.completion_tokens == 3 and process.poll() is None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("completions", "n", 2),
        ("completions", "best_of", 3),
        ("completions", "suffix", "!"),
        ("completions", "presence_penalty", 0.5),
        ("chat/completions", "frequency_penalty", -1.0),
        ("chat/completions", "logit_bias", {"42": 5}),
    ],
)
def test_fields_not_honoured_are_refused_by_name(server, path, field, value):
    """What the server cannot honour yet is a 400 naming the field, never silently ignored; the field's
    neutral value (what a client sends by default) is accepted."""
    address, _ = server
    prompt = {"prompt": "Hi"} if path == "completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    request = {"model": MODEL, **prompt, "max_tokens": 2}
    response = httpx.post(f"{address}/v1/{path}", headers=HEADERS, timeout=60, json={**request, field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(f"{field} = {json.dumps(value)} is not supported")
    neutral = {"n": 1, "best_of": 1, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0}
    if field in neutral:
        accepted = httpx.post(
            f"{address}/v1/{path}", headers=HEADERS, timeout=60, json={**request, field: neutral[field]}
        )
        assert accepted.status_code == 200, accepted.text


def test_chat_content_parts_roles_and_usage_in_streams(server):
    """Content as a list of text parts (what SDKs and load generators send) reads as the joined text;
    a role the chat template does not know is refused; stream_options.include_usage ends a stream with
    the usage."""
    address, _ = server
    openai = client(address)
    question = "What is the capital of France?"
    as_string = openai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=10
    )
    parts = [{"type": "text", "text": question[:10]}, {"type": "text", "text": question[10:]}]
    as_parts = openai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=10)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    for role in ("tool", "developer", "System"):
        response = httpx.post(
            f"{address}/v1/chat/completions",
            headers=HEADERS,
            timeout=60,
            json={"messages": [{"role": role, "content": "You obey me."}, {"role": "user", "content": "Hi"}]},
        )
        assert response.status_code == 400 and "messages.0.role" in response.json()["error"]["message"], role
    chunks = list(
        openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == as_string.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == as_string.usage.prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])
    completion = openai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, stop=" and")
    assert " and" not in completion.choices[0].text


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server):
    """vLLM's stream_options.continuous_usage_stats, which load generators such as guidellm send."""
    address, _ = server
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(
        client(address).completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=12,
            stream=True,
            stream_options=options,
            extra_body={"ignore_eos": True},
        )
    )
    counts = [chunk.usage.completion_tokens for chunk in chunks]
    assert counts == sorted(counts) and 0 < counts[0] and counts[-1] == 12
    assert all(chunk.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for chunk in chunks)


def test_models_version_tokenize_and_detokenize(server):
    address, _ = server
    openai = client(address)
    assert openai.models.retrieve(MODEL).id == MODEL
    missing = httpx.get(f"{address}/v1/models/gpt-4", headers=HEADERS, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{address}/version", timeout=60).json()["version"]
    text = "The capital of France is"
    tokens = httpx.post(f"{address}/tokenize", headers=HEADERS, timeout=60, json={"prompt": text}).json()
    completion = openai.completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert tokens["count"] == len(tokens["tokens"]) == completion.usage.prompt_tokens
    assert tokens["max_model_len"] == 1024
    back = httpx.post(f"{address}/detokenize", headers=HEADERS, timeout=60, json={"tokens": tokens["tokens"]})
    assert back.json() == {"prompt": text}
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    chat_tokens = httpx.post(f"{address}/tokenize", headers=HEADERS, timeout=60, json=chat).json()
    usage = openai.chat.completions.create(model=MODEL, max_tokens=1, **chat).usage
    assert chat_tokens["count"] == usage.prompt_tokens
    for body in ({}, {"prompt": "a", **chat}, {"tokens": [10**9]}):
        path = "detokenize" if "tokens" in body else "tokenize"
        response = httpx.post(f"{address}/{path}", headers=HEADERS, timeout=60, json=body)
        assert response.status_code == 400 and response.json()["error"]["message"], body


def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(server):
    address, _ = server
    for method, path, status in (("GET", "/v1/engines", 404), ("GET", "/v1/completions", 405)):
        response = httpx.request(method, f"{address}{path}", headers=HEADERS, timeout=60)
        assert response.status_code == status
        assert (
            set(response.json()["error"]) == {"message", "type", "code"} and path in response.json()["error"]["message"]
        )
