"""Fixtures shared by the tests; the tests' plain helpers are modules beside this file (models.py,
ranks.py, simulation.py), importable because this directory is put on sys.path here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
if not torch.cuda.is_available():  # before any kernel is defined: Triton's run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from models import TINY_CONFIGS, load_reference, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(name, root / name) for name in TINY_CONFIGS}


@pytest.fixture(scope="session")
def deep_tiny_models(tmp_path_factory) -> dict[str, Path]:
    """5 layers: pipeline splits of 2 and 3 stages that do not divide the layer count."""
    root = tmp_path_factory.mktemp("deep")
    return {name: make_tiny_model(name, root / name, num_hidden_layers=5) for name in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def reference():
    cache = {}

    def get(model_dir: Path):
        if model_dir not in cache:
            cache[model_dir] = load_reference(model_dir)
        return cache[model_dir]

    return get
