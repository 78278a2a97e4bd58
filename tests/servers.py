"""Running the HTTP server from the tests: `mpirun` of `mnemosyne_hpc.serve`, its address, its rank
processes (to signal one alone) and its Prometheus metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ranks import MPIRUN, ROOT


def start_server(
    directory: Path, overrides: list[str], ranks: int = 2, program: tuple[str, ...] = ("-m", "mnemosyne_hpc.serve")
) -> tuple[str, subprocess.Popen]:
    """`mpirun -n ranks python PROGRAM OVERRIDES` (the server, or what wraps it) on any free port; its
    address once it listens, and the process (stdout and stderr together in a pipe)."""
    address_file = directory / "address"
    process = subprocess.Popen(
        [
            MPIRUN,
            "-n",
            str(ranks),
            sys.executable,
            *program,
            *overrides,
            "server.port=0",
            f"server.address_file={address_file}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (address_file.exists() and address_file.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, (
            process.stdout.read() if process.poll() else "slow"
        )
        time.sleep(0.2)
    return address_file.read_text().strip(), process


def kill_job(process: subprocess.Popen) -> None:
    """What is left of a job a test gave up on: mpirun and its ranks (a session of their own)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def rank_pids(root: int) -> list[int]:
    """The rank processes under the mpirun of `root`, in rank order."""
    children, found = {root}, []
    for _ in range(4):
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in children and pid not in children:
                children.add(pid)
    for pid in children - {root}:
        try:
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            if "mnemosyne_hpc.serve" in Path(f"/proc/{pid}/cmdline").read_text() and "PMI_RANK" in environ:
                found.append((int(environ["PMI_RANK"]), pid))
        except OSError:
            pass
    return [pid for _, pid in sorted(found)]


def metric(address: str, name: str, default: float | None = None) -> float:
    """A metric's value; `default` for one not exported (yet: a label's counter appears at its first count)."""
    for line in httpx.get(f"{address}/metrics", timeout=60).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    assert default is not None, f"metric {name} not exported"
    return default
