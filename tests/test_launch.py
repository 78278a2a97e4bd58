"""Rank discovery (distributed/launch.py): which launcher's variables win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mnemosyne_hpc.distributed.launch import (
    check_interfaces,
    cpu_threads,
    discover_rank,
    on_one_host,
    rendezvous_address,
)

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "SLURM_PROCID": "0",
                "SLURM_STEP_NUM_TASKS": "1",
            },
            ("openmpi", 3, 4, 1),
        ),
        (
            {
                "PMI_RANK": "1",
                "PMI_SIZE": "2",
                "MPI_LOCALRANKID": "1",
                "SLURM_PROCID": "0",
                "SLURM_STEP_NUM_TASKS": "1",
            },
            ("mpich", 1, 2, 1),
        ),
        (
            {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0", "RANK": "9", "WORLD_SIZE": "10"},
            ("slurm", 2, 4, 0),
        ),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, ("single", 0, 1, 0)),  # sbatch script outside a step
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ("torchrun", 1, 2, 1)),
        ({}, ("single", 0, 1, 0)),
    ],
)
def test_rank_discovery_precedence(env, expected):
    info = discover_rank(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == expected


@pytest.mark.parametrize(
    "env, one_host",
    [
        # an allocation of 2 tasks per node, a step of 1 per node on 2 nodes: srun keeps the allocation's count
        (
            {
                "SLURM_PROCID": "0",
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_NTASKS_PER_NODE": "2",
                "SLURM_STEP_NUM_NODES": "2",
            },
            False,
        ),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1"}, True),
        ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "1"}, False),
        ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}, True),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, True),
        ({"RANK": "0", "WORLD_SIZE": "2"}, False),  # not said: ranks may be anywhere
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, True),
        ({}, True),
    ],
)
def test_one_host_or_several(env, one_host):
    assert on_one_host(discover_rank(env), env) == one_host


@pytest.mark.parametrize(
    "env, share",
    [
        ({}, 1),
        ({"PMI_RANK": "0", "PMI_SIZE": "1", "MPI_LOCALNRANKS": "1"}, 1),  # torch alone would take one thread
        ({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}, 2),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 2),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}, 2),
        (
            {
                "SLURM_PROCID": "4",
                "SLURM_STEP_NUM_TASKS": "5",
                "SLURM_STEP_TASKS_PER_NODE": "2(x2),1",
                "SLURM_NODEID": "2",
            },
            1,
        ),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 2),
    ],
)
def test_each_rank_takes_its_share_of_the_cores(env, share):
    assert cpu_threads(discover_rank(env), env) == max(1, CORES // share)


def test_omp_num_threads_overrides_the_share():
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "3"}
    assert cpu_threads(discover_rank(env), env) == 3


def test_a_single_rank_under_mpirun_gets_every_core():
    """MPICH's variables as a real mpirun sets them (torch alone would run one thread)."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    probe = (
        "from mnemosyne_hpc.distributed.launch import cpu_threads, discover_rank; print(cpu_threads(discover_rank()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(
        [mpirun, "-n", "1", sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == CORES


def test_a_missing_interface_is_named():
    check_interfaces({"GLOO_SOCKET_IFNAME": "lo"})
    with pytest.raises(RuntimeError, match=r"no interface nosuch0 on host .* \(it has lo"):
        check_interfaces({"GLOO_SOCKET_IFNAME": "lo,nosuch0"})


def test_slurm_steps_of_one_job_rendezvous_on_different_ports():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node0", "SLURM_JOB_ID": "7"}
    ports = {rendezvous_address(discover_rank(env), {**env, "SLURM_STEP_ID": str(step)})[1] for step in range(3)}
    assert len(ports) == 3 and all(20000 <= port < 40000 for port in ports)
