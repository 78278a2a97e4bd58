"""Load a Hugging Face checkpoint shard by shard: each rank reads only the rows or columns it owns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.model.layers import TensorParallel
from mnemosyne_hpc.model.llama import Transformer

# How each of our parameters is cut from the checkpoint: (suffix, [checkpoint suffixes], split)
# split: "rows" (column-parallel), "cols" (row-parallel), "vocab" (padded rows), None (replicated).
_LAYER_PARAMS = [
    ("self_attn.qkv_proj.weight", [f"self_attn.{p}_proj.weight" for p in "qkv"], "rows"),
    ("self_attn.qkv_proj.bias", [f"self_attn.{p}_proj.bias" for p in "qkv"], "rows"),
    ("self_attn.o_proj.weight", ["self_attn.o_proj.weight"], "cols"),
    ("mlp.gate_up_proj.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"], "rows"),
    ("mlp.down_proj.weight", ["mlp.down_proj.weight"], "cols"),
    ("input_layernorm.weight", ["input_layernorm.weight"], None),
    ("post_attention_layernorm.weight", ["post_attention_layernorm.weight"], None),
]


class CheckpointError(ValueError):
    pass


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read lazily."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {model_dir}")
            weight_map = {}
            for f in files:
                with safe_open(f, framework="pt") as handle:
                    weight_map.update({name: f.name for name in handle.keys()})
        self.dir, self.weight_map, self._handles = model_dir, weight_map, {}

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, name: str, split: str | None, tp: TensorParallel) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} missing from the checkpoint in {self.dir}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.dir / file, framework="pt")
        tensor = self._handles[file].get_slice(name)
        rows, cols = (tensor.get_shape() + [1])[:2]
        if split is None:
            return tensor[:]
        if split == "cols":
            width = cols // tp.size
            return tensor[:, tp.rank * width : (tp.rank + 1) * width]
        height = rows // tp.size if split == "rows" else math.ceil(rows / tp.size)
        part = tensor[tp.rank * height : min((tp.rank + 1) * height, rows)]
        return torch.nn.functional.pad(part, (0, 0, 0, height - part.shape[0])) if part.dim() == 2 else part


def _sources(args: ModelArgs, name: str) -> tuple[list[str], str | None]:
    if name == "embed_tokens.weight":
        return ["model.embed_tokens.weight"], "vocab"
    if name == "lm_head.weight":
        return (["model.embed_tokens.weight"] if args.tie_word_embeddings else ["lm_head.weight"]), "vocab"
    if name == "norm.weight":
        return ["model.norm.weight"], None
    _, layer, suffix = name.split(".", 2)
    for ours, theirs, split in _LAYER_PARAMS:
        if suffix == ours:
            return [f"model.layers.{layer}.{t}" for t in theirs], split
    raise CheckpointError(f"no checkpoint source for parameter {name}")


def load_model(
    model_dir: Path, model: Transformer, tp: TensorParallel, dtype: torch.dtype, device: torch.device
) -> Transformer:
    """`model`, built on the meta device for this rank's stage and TP shard, with its weights from the
    checkpoint in `model_dir`, in `dtype` on `device`."""
    args, first_stage, last_stage = model.args, model.embed_tokens is not None, model.lm_head is not None
    checkpoint = Checkpoint(model_dir)
    if not args.tie_word_embeddings and last_stage and not checkpoint.has("lm_head.weight"):
        raise CheckpointError(f"lm_head.weight missing from {model_dir} and tie_word_embeddings is false")
    state = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        sources, split = _sources(args, name)
        tensor = torch.cat([checkpoint.read(s, split, tp) for s in sources], dim=0)
        if tensor.shape != param.shape:
            raise CheckpointError(
                f"{name}: checkpoint gives shape {tuple(tensor.shape)}, model expects "
                f"{tuple(param.shape)} (config.json does not match the weights?)"
            )
        state[name] = tensor.to(dtype)
    model.load_state_dict(state, assign=True, strict=True)
    if args.tie_word_embeddings and first_stage and last_stage:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device).eval()
