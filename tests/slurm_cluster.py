"""A real SLURM cluster for the tests (Debian's slurm-wlm): slurmctld on the first node and one slurmd
per node, each with its own spool, pid and log files, started for a test and stopped after."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CONF = """ClusterName=ci
SlurmctldHost={controller}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=30
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _here(node: int, argv: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, **kwargs)


class SlurmCluster:
    """`nodes`: (name, address) pairs; `run(node, argv, **kwargs)` runs a command on node `node`
    (by default here, for a cluster of one node on this host)."""

    def __init__(self, directory: Path, nodes: list[tuple[str, str]], run=_here):
        if shutil.which("slurmctld") is None:
            pytest.skip("SLURM is not installed (.ci/run installs Debian's slurm-wlm)")
        self.directory, self.nodes, self.run_on = directory, nodes, run
        conf = directory / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        (directory / "state").mkdir()
        for name, _ in nodes:
            (directory / f"spool-{name}").mkdir()
        conf.write_text(
            CONF.format(
                dir=directory,
                controller=f"{nodes[0][0]}({nodes[0][1]})",
                nodes="\n".join(f"NodeName={n} NodeAddr={a} CPUs=8 State=UNKNOWN" for n, a in nodes),
                names=",".join(n for n, _ in nodes),
            )
        )

    def __enter__(self) -> SlurmCluster:
        try:
            self.run_on(0, ["slurmctld", "-i"], env=self.env, check=True)
            for node, (name, _) in enumerate(self.nodes):
                self.run_on(node, ["slurmd", "-N", name], env=self.env, check=True)
            deadline = time.monotonic() + 30
            while self.command(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split() != ["idle"] * len(self.nodes):
                assert time.monotonic() < deadline, self.log("slurmctld")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for pid_file in self.directory.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass

    def log(self, daemon: str) -> str:
        path = self.directory / f"{daemon}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def command(self, argv: list, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, scancel, …) on the first node."""
        return self.run_on(0, argv, env={**self.env, **(env or {})}, capture_output=True, text=True, **kwargs)

    def submit(self, args: list, cwd: Path, env: dict | None = None) -> str:
        """`sbatch ARGS` from `cwd`; the job id."""
        out = self.command(["sbatch", "--parsable", *args], env=env, cwd=cwd, check=True)
        return out.stdout.strip().split(";")[0]

    def details(self, job: str) -> str:
        return self.command(["scontrol", "show", "job", job]).stdout

    def state(self, job: str) -> str:
        fields = self.details(job).split()
        return next((f.split("=", 1)[1] for f in fields if f.startswith("JobState=")), "UNKNOWN")

    def wait(self, job: str, timeout: float) -> str:
        """The job's final state, once it has one."""
        deadline = time.monotonic() + timeout
        while (state := self.state(job)) not in DONE:
            assert time.monotonic() < deadline, f"job {job} still {state} after {timeout:g} s"
            time.sleep(0.5)
        return state
