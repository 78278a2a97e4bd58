"""Model hyper-parameters read from a Hugging Face config.json (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
_ARCHITECTURE_OF_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]  # None, or {"rope_type": "llama3" | "linear", ...}
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        architecture = (config.get("architectures") or [_ARCHITECTURE_OF_TYPE.get(config.get("model_type"), "?")])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r} (only silu)")
        window = config.get("sliding_window")
        if window is not None and (architecture == "MistralForCausalLM" or config.get("use_sliding_window")):
            raise ValueError(
                f"sliding-window attention (window {window}) is not supported: it would "
                "change results beyond the window"
            )
        # transformers 5 writes rope settings as `rope_parameters`; older files use rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        scaling = rope or config.get("rope_scaling")
        if scaling:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope_type {scaling['rope_type']!r} (default, linear, llama3)")
        heads = config["num_attention_heads"]
        eos = config.get("eos_token_id")
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    @classmethod
    def from_dir(cls, path: Path) -> "ModelArgs":
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()))
