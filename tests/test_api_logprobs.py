"""Log-probabilities through the OpenAI API (completions with echo, chat with top_logprobs, streamed and
whole) against transformers, and lm-evaluation-harness scoring and generating against the server: a
2-rank KVP server in float32, whose prompts span both KVP groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from mnemosyne_hpc.config import compose, resolve_cache_dir
from mnemosyne_hpc.model.gguf import convert_gguf
from ranks import ROOT
from servers import rank_pids, start_server

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct.Q4_1"
TOLERANCE = 2e-3  # |Δ log-probability| against transformers in float32
PROMPT = (
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid. The capital "
    "of Portugal is Lisbon. The capital of Austria is Vienna. The capital of Greece is Athens. The capital of"
)
GROUP_TOKENS = 40


@pytest.fixture(scope="module")
def model_dir() -> Path:
    cfg = compose([])
    return convert_gguf(Path(cfg.model.path), resolve_cache_dir(cfg))


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    address, process = start_server(
        tmp_path_factory.mktemp("serve"),
        [
            "parallel.kvp=2",
            f"parallel.max_tokens_per_kvp_group={GROUP_TOKENS}",
            f"cache.max_model_len={2 * GROUP_TOKENS}",
            "model.dtype=float32",
            f"server.api_key={KEY}",
        ],
    )
    yield address
    os.kill(rank_pids(process.pid)[0], signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output[-3000:]


def reference(hf, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits: row i is the distribution of token i + 1."""
    model, _ = hf
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].double(), dim=-1)


def post(address: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{address}/v1/{path}", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_echo_and_logprobs_match_transformers(server, hf):
    _, tokenizer = hf
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "logprobs": 3, "echo": True}
    choice = post(server, "completions", body)["choices"][0]
    prompt_ids = tokenizer.encode(PROMPT)
    assert len(prompt_ids) > GROUP_TOKENS  # past the first KVP group
    logprobs = choice["logprobs"]
    tokens = len(prompt_ids) + 4
    assert all(len(logprobs[key]) == tokens for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    ref = reference(hf, prompt_ids)
    for i in range(1, len(prompt_ids)):
        assert logprobs["tokens"][i] == tokenizer.decode([prompt_ids[i]])
        assert abs(logprobs["token_logprobs"][i] - ref[i - 1, prompt_ids[i]].item()) <= TOLERANCE, i
        top = logprobs["top_logprobs"][i]
        best = ref[i - 1].topk(3)
        assert [tokenizer.decode([t]) for t in best.indices.tolist()] == list(top)[:3], i
        assert torch.allclose(torch.tensor(list(top.values())[:3], dtype=torch.float64), best.values, atol=TOLERANCE)
    # the answer's tokens are greedy: each the most likely, and its text the answer's
    ids = list(prompt_ids)
    for i in range(len(prompt_ids), tokens):
        row = reference(hf, ids)[-1]
        ids.append(int(row.argmax()))
        assert logprobs["tokens"][i] == tokenizer.decode([ids[-1]])
        assert abs(logprobs["token_logprobs"][i] - row.max().item()) <= TOLERANCE
        assert logprobs["token_logprobs"][i] == max(logprobs["top_logprobs"][i].values())
    assert choice["text"] == PROMPT + tokenizer.decode(ids[len(prompt_ids) :])
    assert logprobs["text_offset"][1] == len(logprobs["tokens"][0])

    scored = post(server, "completions", {**body, "max_tokens": 0})
    assert scored["choices"][0]["text"] == PROMPT and scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["tokens"] == logprobs["tokens"][: len(prompt_ids)]
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        logprobs["token_logprobs"][1 : len(prompt_ids)], abs=1e-5
    )

    streamed = list(OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0).completions.create(**body, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice["text"]
    joined = [lp for c in streamed if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert joined[1:] == pytest.approx(logprobs["token_logprobs"][1:], abs=1e-5)
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == logprobs["text_offset"]


def test_chat_logprobs_match_transformers(server, hf):
    _, tokenizer = hf
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    answer = post(server, "chat/completions", body)["choices"][0]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    content = answer["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        row = reference(hf, ids)[-1]
        ids.append(int(row.argmax()))
        text = tokenizer.decode([ids[-1]])
        assert entry["token"] == text and entry["bytes"] == list(text.encode())
        assert abs(entry["logprob"] - row.max().item()) <= TOLERANCE
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([t]) for t in row.topk(2).indices]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
    streamed = list(
        OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0).chat.completions.create(**body, stream=True)
    )
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [entry["token"] for entry in content]
    refused = httpx.post(
        f"{server}/v1/chat/completions",
        json={**body, "logprobs": False},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert refused.status_code == 400 and "top_logprobs needs logprobs = true" in refused.json()["error"]["message"]


CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Spain", "Madrid")]
TASKS = {
    "capitals_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "The capital of {{country}} is",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    },
    "capitals_answer": {
        "output_type": "generate_until",
        "doc_to_text": "The capital of {{country}} is",
        "doc_to_target": "{{capital}}",
        "generation_kwargs": {"until": ["."], "max_gen_toks": 4},
        "filter_list": [
            {
                "name": "first_word",
                "filter": [{"function": "regex", "regex_pattern": r"^\s*(\w+)"}, {"function": "take_first"}],
            }
        ],
        "metric_list": [{"metric": "exact_match", "ignore_punctuation": True}],
    },
}


def samples(directory: Path, task: str) -> list[dict]:
    """The samples lm-eval logged for `task` (--log_samples)."""
    path = next(directory.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_scores_and_generates_against_the_server(server, hf, model_dir, tmp_path):
    """lm-evaluation-harness's local-completions model over two tasks defined here: the log-likelihood
    of every choice (echo + logprobs, max_tokens 1) equals transformers', and every generation is
    transformers' greedy text."""
    _, tokenizer = hf
    rows = [
        {"country": c, "capital": a, "choices": [a, "Banana", CAPITALS[i - 1][1]], "answer": 0}
        for i, (c, a) in enumerate(CAPITALS)
    ]
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, task in TASKS.items():
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
        (tmp_path / f"{name}.yaml").write_text(json.dumps({**spec, "test_split": "test", **task}))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = f"model={MODEL},base_url={server}/v1/completions,tokenizer={model_dir},num_concurrent=2,max_retries=1"
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args]
    command += ["--tasks", ",".join(TASKS), "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")]
    command += ["--log_samples", "--seed", "0"]
    env = {**os.environ, **offline, "OPENAI_API_KEY": KEY, "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-1500:])
    scored, generated = (samples(tmp_path / "out", name) for name in TASKS)
    assert len(scored) == len(generated) == len(rows)
    for sample in scored:
        for arguments, response in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            whole, prefix = tokenizer.encode(context + continuation), tokenizer.encode(context)
            ref = reference(hf, whole)
            expected = sum(ref[p - 1, whole[p]].item() for p in range(len(prefix), len(whole)))
            assert abs(float(response[0][0]) - expected) <= 2 * TOLERANCE, (context, continuation, response, expected)
    for sample in generated:
        ids = tokenizer.encode(sample["arguments"]["gen_args_0"]["arg_0"])
        prompt_tokens = len(ids)
        for _ in range(4):
            ids.append(int(reference(hf, ids)[-1].argmax()))
        assert sample["resps"][0][0] == tokenizer.decode(ids[prompt_tokens:]).split(".")[0]
    summary = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert summary["capitals_choice"]["acc,none"] == 1.0 and summary["capitals_answer"]["exact_match,first_word"] == 1.0
