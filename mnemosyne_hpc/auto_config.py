"""The knobs whose default depends on the model and the machine, settled once the checkpoint is known:
`model.dtype=auto` and `cache.max_model_len=0`.

A serving system runs a checkpoint in the dtype it was saved in, and serves as long a context as the
model was trained for; a fixed float32 and 8192 made a bfloat16 checkpoint run at a fraction of the
CPU's speed and refused any model whose window is shorter. An explicit value is kept, and one longer
than the model's window is an error, not silently shortened.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from mnemosyne_hpc.config import Config
from mnemosyne_hpc.kernels.build import cpu_flags
from mnemosyne_hpc.model.args import ModelArgs

BF16_UNITS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo flags of CPUs that compute in bfloat16 at full speed


GGUF_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
HALF = ("bfloat16", "float16")


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype config.json names (`torch_dtype`, or `dtype` as newer transformers write it); float32
    when it names none. A converted GGUF model (`model/gguf.py`) names the GGUF type of most of its
    weights: its float dtype, or `quantized <type>` (such as Q4_1)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if "gguf_weights" in config:
        return GGUF_DTYPES.get(config["gguf_weights"], f"quantized {config['gguf_weights']}")
    return str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")


def auto_dtype(saved: str, device: torch.device) -> str:
    """The checkpoint's dtype where the device computes in it at full speed. A half-precision checkpoint
    (bfloat16 or float16) runs on a CPU in bfloat16 where it has bf16 units (AVX512-BF16 or AMX; our
    kernels' fast path), else in float32; on a GPU without bfloat16, in float16. A quantized one (4 to 8
    bits a weight, whose quantisation error is far above bfloat16's rounding) runs as a half-precision
    one. Anything else: float32."""
    if saved.startswith("quantized"):
        saved = "bfloat16"
    if saved not in HALF:
        return "float32"
    if device.type == "cpu":
        return "bfloat16" if cpu_flags() & BF16_UNITS else "float32"
    if saved == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "float16"
    return saved


def model_len(cfg: Config, args: ModelArgs, kv_blocks: int) -> tuple[int, str]:
    """cache.max_model_len and why: an explicit value, checked against the model's window; else the
    window (max_position_embeddings), shortened to what one request can hold in the KV pool of
    `kv_blocks` blocks per rank (spread over parallel.kvp groups of at most
    parallel.max_tokens_per_kvp_group tokens each)."""
    window, explicit = args.max_position_embeddings, cfg.cache.max_model_len
    if explicit > window:
        raise ValueError(
            f"cache.max_model_len = {explicit} exceeds the model's window (max_position_embeddings = "
            f"{window}); leave cache.max_model_len at 0 to take the model's window"
        )
    if explicit:
        return explicit, "as configured"
    group_tokens = kv_blocks * cfg.cache.block_size
    if cfg.parallel.max_tokens_per_kvp_group:
        group_tokens = min(group_tokens, cfg.parallel.max_tokens_per_kvp_group)
    room = cfg.parallel.kvp * group_tokens
    if room >= window:
        return window, "the model's window, max_position_embeddings"
    if room < 2:
        raise ValueError(f"the KV pool holds {room} tokens of one request; enlarge cache.kv_memory_gib")
    return room, (
        f"what one request can hold in the KV pool ({kv_blocks} blocks of {cfg.cache.block_size} tokens per "
        f"rank, {cfg.parallel.kvp} KVP groups); the model's window is {window}: enlarge cache.kv_memory_gib for it"
    )


def settle(cfg: Config, args: ModelArgs, model_dir: Path, device: torch.device, kv_blocks) -> tuple[Config, list[str]]:
    """`cfg` with model.dtype and cache.max_model_len settled, and a line for each that was left to
    this function. `kv_blocks(dtype)` is the KV pool's blocks per rank in that dtype."""
    dtype, notes = cfg.model.dtype, []
    if dtype == "auto":
        saved = checkpoint_dtype(model_dir)
        dtype = auto_dtype(saved, device)
        notes.append(f"model.dtype=auto: {dtype} (the checkpoint is {saved}; {device.type})")
    length, why = model_len(cfg, args, kv_blocks(getattr(torch, dtype)))
    if not cfg.cache.max_model_len:
        notes.append(f"cache.max_model_len=0: {length} ({why})")
    settled = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype=dtype),
        cache=dataclasses.replace(cfg.cache, max_model_len=length),
    )
    return settled, notes
