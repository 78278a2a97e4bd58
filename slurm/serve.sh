#!/usr/bin/env bash
# The OpenAI-compatible server on a SLURM allocation, one rank per task (per GPU on GPU nodes):
#   sbatch slurm/serve.sh parallel.kvp=2                         # 2 ranks on one node
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 slurm/serve.sh parallel.tp=4 parallel.kvp=2
# The ranks are nodes × tasks per node (2 × 4 above; the defaults below give 1 × 2). Set the size with
# --nodes and --ntasks-per-node: a --ntasks of its own would cap the tasks per node the line above asks for.
# Arguments are Hydra overrides (server.host=0.0.0.0 to accept other machines, server.port=...).
# Rank 0 writes the endpoint, http://host:port, to $MNEMOSYNE_ADDRESS_FILE (default:
# mnemosyne-serve-<job id>.address in the submit directory) once it listens. `scancel --signal=TERM
# <job id>` stops it cleanly (the job ends COMPLETED); a plain scancel works too.
#SBATCH --job-name=mnemosyne-serve
#SBATCH --output=mnemosyne-serve-%j.log
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
address_file="${MNEMOSYNE_ADDRESS_FILE:-$PWD/mnemosyne-serve-${SLURM_JOB_ID}.address}"
exec srun --kill-on-bad-exit=1 .venv/bin/python -m mnemosyne_hpc.serve server.address_file="$address_file" "$@"
