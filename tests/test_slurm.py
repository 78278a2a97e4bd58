"""`sbatch slurm/serve.sh` on a real single-node SLURM cluster (started here, torn down after):
2 ranks, the embedded model, answers through the openai client, a clean stop."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from openai import OpenAI

from ranks import ROOT

CONF = """ClusterName=ci
SlurmctldHost=localhost
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=30
NodeName=localhost CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def cluster(tmp_path):
    if shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (.ci/run installs Debian's slurm-wlm)")
    for sub in ("state", "spool"):
        (tmp_path / sub).mkdir()
    conf = tmp_path / "slurm.conf"
    conf.write_text(CONF.format(dir=tmp_path))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-i"], env=env, check=True)
    subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True)
    try:
        deadline = time.monotonic() + 30
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (tmp_path / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env, tmp_path
    finally:
        for daemon in ("slurmctld", "slurmd"):
            pid_file = tmp_path / f"{daemon}.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), 15)


@pytest.mark.slow  # a SLURM cluster started, a job queued, the model loaded, the cluster stopped
def test_sbatch_serve_answers_openai_clients_and_stops_cleanly(cluster):
    env, directory = cluster
    address_file = directory / "address"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={directory}/job-%j.log",
            "slurm/serve.sh",
            "parallel.kvp=2",
            "server.port=0",
            "cache.max_model_len=1024",
            "scheduler.chunking=fixed",
            "scheduler.priority=fcfs",
        ],
        cwd=ROOT,
        env={**env, "MNEMOSYNE_ADDRESS_FILE": str(address_file)},
        capture_output=True,
        text=True,
        check=True,
    )
    job = submitted.stdout.strip().split(";")[0]
    log = directory / f"job-{job}.log"
    deadline = time.monotonic() + 240
    while not (address_file.exists() and address_file.read_text().strip()):
        state = _job_state(job, env)
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

    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)
    deadline = time.monotonic() + 60
    while (state := _job_state(job, env)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(0.5)
    details = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    assert state == "COMPLETED" and "ExitCode=0:0" in details, details + log.read_text()[-3000:]


def _job_state(job: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((field.split("=", 1)[1] for field in out.split() if field.startswith("JobState=")), "UNKNOWN")
