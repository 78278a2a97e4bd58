"""`sbatch slurm/serve.sh` on a real single-node SLURM cluster (started here, torn down after):
2 ranks, the embedded model, answers through the openai client, a clean stop."""

from __future__ import annotations

import time

import pytest
from openai import OpenAI

from ranks import ROOT
from slurm_cluster import SlurmCluster


@pytest.fixture
def cluster(tmp_path):
    with SlurmCluster(tmp_path, [("localhost", "127.0.0.1")]) as cluster:
        yield cluster


@pytest.mark.slow  # a SLURM cluster started, a job queued, the model loaded, the cluster stopped
def test_sbatch_serve_answers_openai_clients_and_stops_cleanly(cluster):
    address_file = cluster.directory / "address"
    job = cluster.submit(
        [
            f"--output={cluster.directory}/job-%j.log",
            "slurm/serve.sh",
            "parallel.kvp=2",
            "server.port=0",
            "cache.max_model_len=1024",
            "scheduler.chunking=fixed",
            "scheduler.priority=fcfs",
        ],
        cwd=ROOT,
        env={"MNEMOSYNE_ADDRESS_FILE": str(address_file)},
    )
    log = cluster.directory / f"job-{job}.log"
    deadline = time.monotonic() + 240
    while not (address_file.exists() and address_file.read_text().strip()):
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, (
            f"job {job} is {state}: {log.read_text()[-3000:] if log.exists() else ''}"
        )
        time.sleep(0.5)

    openai = OpenAI(base_url=address_file.read_text().strip() + "/v1", api_key="none", max_retries=0)
    model = openai.models.list().data[0].id
    completion = openai.completions.create(model=model, prompt="The capital of France is", max_tokens=8)
    assert completion.choices[0].text.startswith(" Paris")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = openai.chat.completions.create(model=model, messages=messages, max_tokens=12)
    assert "Paris" in chat.choices[0].message.content
    streamed = openai.chat.completions.create(model=model, messages=messages, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content

    cluster.command(["scancel", "--signal=TERM", job], check=True)
    state = cluster.wait(job, timeout=60)
    details = cluster.details(job)
    assert state == "COMPLETED" and "ExitCode=0:0" in details, details + log.read_text()[-3000:]
