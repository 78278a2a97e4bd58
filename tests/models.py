"""Tiny random-weight Hugging Face checkpoints for exactness tests (made locally, no download), and
the transformers reference that the engine's runs are held to."""

from __future__ import annotations

import random
from pathlib import Path

import torch

COMMON = dict(
    vocab_size=250,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)

TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=1000000.0, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, vocab_size=256)),
}


def make_tiny_model(name: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    import transformers

    config_class, model_class, extra = TINY_CONFIGS[name]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # biases start at zero: make them matter (Qwen2's QKV bias)
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    return directory


def make_tiny_text_model(directory: Path, **overrides) -> Path:
    """A tiny random Llama that reads and writes text through the embedded SmolLM2's tokenizer: a server
    on it starts in seconds and streams text (of no meaning)."""
    import shutil

    from mnemosyne_hpc.config import compose, resolve_cache_dir
    from mnemosyne_hpc.model.gguf import convert_gguf

    cfg = compose([])
    smollm2 = convert_gguf(Path(cfg.model.path), resolve_cache_dir(cfg))
    make_tiny_model("llama", directory, vocab_size=49152, **overrides)
    for path in smollm2.iterdir():
        if path.name != "config.json" and path.suffix != ".safetensors":
            shutil.copy(path, directory / path.name)
    return directory


def load_reference(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# the exactness workload: prompts of these lengths, each decoded greedily for DECODE_STEPS tokens
PROMPT_LENGTHS = (97, 13, 130)
DECODE_STEPS = 64


def prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with transformers, recomputing the whole sequence each step."""
    tokens, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([tokens])).logits[0, -1].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
    return tokens[len(prompt) :], torch.stack(logits)


def assert_matches_reference(output: dict, ref_tokens: list[int], ref_logits: torch.Tensor, label: str) -> None:
    logits = output["logits"]
    assert logits.shape == ref_logits.shape, label
    error = (logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    assert error <= 1e-3 * scale, f"{label}: max |Δlogit| = {error:.2e} > 1e-3 × {scale:.2f}"
    assert output["token_ids"] == ref_tokens, f"{label}: greedy tokens differ"
