#!/usr/bin/env bash
# mpirun from the project's .venv (MPICH wheel): launch/mpirun.sh -n 3 python -m mnemosyne_hpc.generate parallel.tp=3
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$here/.venv/bin:$PATH"
exec mpirun "$@"
