#!/usr/bin/env bash
# Benchmark sweeps on a SLURM allocation: bench/sweep.py starts one mpirun job per point inside it
# (the MPICH wheel's mpirun works in an allocation), so the allocation's tasks bound the ranks:
#   sbatch --nodes=1 --ntasks=4 slurm/bench.sh --layouts tp1 tp2 spp2 kvp2 tp2-kvp2 --contexts 4096 32768
# Arguments go to bench/sweep.py; results land in bench/results/ of the submit directory.
#SBATCH --job-name=mnemosyne-bench
#SBATCH --output=mnemosyne-bench-%j.log
#SBATCH --nodes=1
#SBATCH --ntasks=2
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec .venv/bin/python bench/sweep.py "$@"
