"""Where a performance model is stored: one profile per model shape, dtype, hardware and layout."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from mnemosyne_hpc.config import Config, resolve_cache_dir
from mnemosyne_hpc.model.args import ModelArgs

PROFILE_FORMAT = 8  # part of the key: a profile of an older format is never loaded


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} × {torch.get_num_threads()} threads"


def profile_key(args: ModelArgs, dtype: str, hardware: str, layout: dict) -> str:
    shape = {
        k: getattr(args, k)
        for k in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        )
    }
    text = json.dumps(
        {"model": shape, "dtype": dtype, "hardware": hardware, "layout": layout, "format": PROFILE_FORMAT},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_path(cfg: Config, args: ModelArgs, device: torch.device) -> Path:
    """`scheduler.profile`, or `<model.cache_dir>/profiles/<key>.json`."""
    if cfg.scheduler.profile:
        return Path(cfg.scheduler.profile).expanduser()
    layout = {"tp": cfg.parallel.tp, "spp": cfg.parallel.spp, "kvp": cfg.parallel.kvp}
    key = profile_key(args, cfg.model.dtype, hardware_name(device), layout)
    return resolve_cache_dir(cfg) / "profiles" / f"{key}.json"
