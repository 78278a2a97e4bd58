#!/usr/bin/env bash
# Batch generation on a SLURM allocation, one rank per GPU (or per CPU slot without GPUs):
#   sbatch --nodes=1 --ntasks=2 slurm/generate.sh parallel.kvp=2 generate.input=prompts.jsonl
# Ranks find each other through the srun step's variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
# SLURM_STEP_NODELIST); no MPI needed. Arguments are Hydra overrides.
#SBATCH --job-name=mnemosyne-generate
#SBATCH --output=mnemosyne-generate-%j.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
exec srun --kill-on-bad-exit=1 .venv/bin/python -m mnemosyne_hpc.generate "$@"
