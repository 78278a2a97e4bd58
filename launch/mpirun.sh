#!/usr/bin/env bash
# mpirun from the project's .venv (MPICH wheel): launch/mpirun.sh -n 2 python -m mnemosyne_hpc.generate parallel.kvp=2
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$here/.venv/bin:$PATH"
exec mpirun "$@"
