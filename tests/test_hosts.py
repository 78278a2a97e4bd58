"""Ranks on two hosts (network namespaces joined by a bridge: tests/hosts.py). Each layout split across
the hosts (TP=2, KVP=2, SPP=2) is exact against one rank when launched by `mpirun -f HOSTFILE` and by
`sbatch` on a two-node SLURM cluster; the server on two nodes answers an OpenAI client on another host;
a host lost (killed or unplugged) or never joining ends the other host's ranks within parallel.timeout_s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from hosts import Hosts
from models import DECODE_STEPS, assert_matches_reference
from ranks import (
    MPIRUN,
    ROOT,
    engine_job,
    free_port,
    greedy_cases,
    kvp_overrides,
    kvp_prompts,
    long_job,
    run_engine,
    start_rank,
    wait_for_progress_bar,
)
from slurm_cluster import SlurmCluster

LAYOUTS = {"tp": (2, 1, 1), "kvp": (1, 1, 2), "spp": (1, 2, 1)}  # (tp, spp, kvp), one rank per host
MAX_MODEL_LEN = 160
TIMEOUT_S = 8


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hosts")
    try:
        with Hosts(2, directory) as hosts:
            yield hosts
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make network namespaces here ({' '.join(e.cmd)}: {e.stderr.strip()})")


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), list(zip(hosts.names, hosts.addresses)), hosts.run) as c:
        yield c


@pytest.fixture(scope="module")
def layouts(tiny_models, reference, tmp_path_factory):
    """Per layout: the engine worker's cases, overrides, and the one-rank results to match."""
    model_dir = tiny_models["llama"]
    cases = greedy_cases(kvp_prompts(2, reference(model_dir).config.vocab_size), (7, 0), DECODE_STEPS)
    one_rank = run_engine(tmp_path_factory.mktemp("one"), 1, kvp_overrides(model_dir, 1, 1, 1, MAX_MODEL_LEN), cases)
    overrides = {name: kvp_overrides(model_dir, *shape, MAX_MODEL_LEN) for name, shape in LAYOUTS.items()}
    return cases, overrides, one_rank


def assert_matches_one_rank(results: dict, layouts, label: str) -> None:
    cases, _, one_rank = layouts
    for case in cases:
        for index, single in enumerate(one_rank[case["name"]]["outputs"]):
            output = results[case["name"]]["outputs"][index]
            name = f"{label} {case['name']} prompt {index}"
            assert_matches_reference(output, single["token_ids"], single["logits"], name)


def test_hosts_are_apart(hosts):
    """Each host sees its own name and address only; a loopback port on one is not open on the other."""
    for host, (name, address) in enumerate(zip(hosts.names, hosts.addresses)):
        seen = hosts.run(host, ["sh", "-c", "hostname; ip -4 -o addr show"], capture_output=True, text=True).stdout
        assert seen.startswith(name + "\n") and address in seen and hosts.addresses[1 - host] not in seen
    server = hosts.popen(0, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "8765"])
    try:
        probe = "import socket, time; time.sleep(1); socket.create_connection(('{}', 8765), timeout=2)"
        assert hosts.run(0, [sys.executable, "-c", probe.format("127.0.0.1")]).returncode == 0
        assert hosts.run(1, [sys.executable, "-c", probe.format("127.0.0.1")], capture_output=True).returncode != 0
    finally:
        server.kill()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mpirun_with_a_hostfile(layout, hosts, layouts, tmp_path):
    """`mpirun -f HOSTFILE -n 2` with one slot per host: hydra starts the far rank over ssh; gloo on the
    interface named by GLOO_SOCKET_IFNAME, as on hosts with several networks."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{name}:1\n" for name in hosts.names))
    env = {**os.environ, "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(hosts.ssh), "GLOO_SOCKET_IFNAME": "eth0"}

    def across_hosts(n, args):
        command = [MPIRUN, "-f", hostfile, "-n", n, sys.executable, *args]
        return hosts.run(0, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    _, overrides, _ = layouts
    results = run_engine(tmp_path, 2, overrides[layout], layouts[0], launch=across_hosts)
    assert_matches_one_rank(results, layouts, f"mpirun {layout}=2 across hosts")


def test_sbatch_on_two_nodes(cluster, layouts, tmp_path):
    """One `srun -N 2 -n 2` step per layout, in a job of two nodes with room for two tasks each (so
    SLURM_NTASKS_PER_NODE says 2 while each step has one rank per node)."""
    cases, overrides, _ = layouts
    steps, outputs = [], {}
    for layout in LAYOUTS:
        args, outputs[layout] = engine_job(tmp_path / layout, overrides[layout], cases)
        steps.append(f"srun -N 2 -n 2 --kill-on-bad-exit=1 {sys.executable} {' '.join(args)}")
    script = tmp_path / "layouts.sh"
    script.write_text("#!/bin/sh\nset -e\n" + "\n".join(steps) + "\n")
    log = tmp_path / "job.log"
    job = cluster.submit(["--nodes=2", "--ntasks-per-node=2", f"--output={log}", script], cwd=ROOT)
    state = cluster.wait(job, timeout=300)
    assert state == "COMPLETED", f"{cluster.details(job)}\n{log.read_text()[-4000:]}"
    for layout, out in outputs.items():
        assert_matches_one_rank(torch.load(out), layouts, f"sbatch {layout}=2 on two nodes")


@pytest.mark.slow  # the embedded model loaded on four ranks, the server started and stopped
def test_server_on_two_nodes(cluster, hosts, tmp_path):
    """slurm/serve.sh on 2 nodes × 2 tasks: the pipeline's stages on different nodes, each stage's two
    KVP groups on one node."""
    address_file = tmp_path / "address"
    log = tmp_path / "job.log"
    overrides = ["parallel.spp=2", "parallel.kvp=2", "server.host=0.0.0.0", "server.port=0", "cache.max_model_len=1024"]
    job = cluster.submit(
        ["--nodes=2", "--ntasks-per-node=2", f"--output={log}", "slurm/serve.sh", *overrides],
        cwd=ROOT,
        env={"MNEMOSYNE_ADDRESS_FILE": str(address_file)},
    )
    deadline = time.monotonic() + 240
    while not (address_file.exists() and address_file.read_text().strip()):
        state = cluster.state(job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING") and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    address = address_file.read_text().strip()
    assert address.startswith("http://node0:"), address
    # a client on the other host, through the openai package
    client = (
        "import json, sys\nfrom openai import OpenAI\n"
        "openai = OpenAI(base_url=sys.argv[1] + '/v1', api_key='none', max_retries=0)\n"
        "model = openai.models.list().data[0].id\n"
        "text = openai.completions.create(model=model, prompt='The capital of France is', max_tokens=8)"
        ".choices[0].text\n"
        "messages = [{'role': 'user', 'content': 'What is the capital of France?'}]\n"
        "stream = openai.chat.completions.create(model=model, messages=messages, max_tokens=12, stream=True)\n"
        "print(json.dumps({'text': text, 'chat': ''.join(c.choices[0].delta.content or '' for c in stream)}))\n"
    )
    answer = hosts.run(1, [sys.executable, "-c", client, address], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr[-3000:]
    replies = json.loads(answer.stdout)
    assert replies["text"].startswith(" Paris") and "Paris" in replies["chat"], replies
    cluster.command(["scancel", "--signal=TERM", job], check=True)
    state = cluster.wait(job, timeout=60)
    assert state == "COMPLETED" and "ExitCode=0:0" in cluster.details(job), log.read_text()[-3000:]


def test_host_that_never_joins(hosts, tiny_models, tmp_path):
    """Rank 0 on node0 waits for a rank 1 that node1 never starts (torchrun-style variables)."""
    started = time.monotonic()
    log = tmp_path / "rank0.err"
    args = long_job(tiny_models, tmp_path, TIMEOUT_S)
    rank0 = start_rank(0, 2, free_port(), args, log, master="node0", on=lambda argv: hosts.command(0, argv))
    rank0.wait(timeout=TIMEOUT_S + 60)
    stderr = log.read_text()
    assert rank0.returncode != 0
    assert "a rank never arrived" in stderr and f"within {TIMEOUT_S}s" in stderr, stderr[-2000:]
    assert time.monotonic() - started < TIMEOUT_S + 45


@pytest.mark.parametrize("loss", ["killed", "unplugged"])
def test_host_lost_mid_run(loss, tiny_models, tmp_path, tmp_path_factory):
    """Node1's ranks all killed, or its cable cut, while TP=2 runs across the hosts: rank 0 on node0
    ends non-zero, saying it lost its peer, within parallel.timeout_s."""
    with Hosts(2, tmp_path_factory.mktemp("lost")) as hosts:  # its own hosts: one of them gets unplugged
        port, args = free_port(), long_job(tiny_models, tmp_path, TIMEOUT_S)
        logs = [tmp_path / f"rank{r}.err" for r in range(2)]
        ranks = [
            start_rank(r, 2, port, args, logs[r], master="node0", on=lambda argv, r=r: hosts.command(r, argv))
            for r in range(2)
        ]
        wait_for_progress_bar(ranks[0], logs[0], timeout=90)
        time.sleep(1.0)
        lost = time.monotonic()
        hosts.kill(1) if loss == "killed" else hosts.cut(1)
        ranks[0].wait(timeout=TIMEOUT_S + 60)
        noticed = time.monotonic() - lost
        stderr = logs[0].read_text()
        assert ranks[0].returncode not in (0, None)
        assert "lost contact with a peer rank" in stderr, stderr[-2000:]
        assert noticed < TIMEOUT_S + 10, f"rank 0 took {noticed:.1f} s to notice"
        if loss == "unplugged":  # the unplugged host's rank is alone and times out too
            ranks[1].wait(timeout=TIMEOUT_S + 60)
            assert ranks[1].returncode not in (0, None)
