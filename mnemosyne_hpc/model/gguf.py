"""Turn a GGUF file into a cached Hugging Face directory (config.json, safetensors, tokenizer).

transformers dequantises the GGUF weights (and undoes llama.cpp's Q/K permutation); we write the
result once, keyed by the file's path, size and modification time, and load it like any checkpoint.
config.json keeps the type that holds most of the file's weights (`gguf_weights`, such as Q4_1): the
safetensors are float32, but the model's precision is the GGUF's (`auto_config.checkpoint_dtype`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

FORMAT = 2  # of the converted directory: a new one is converted when it changes


def converted_dir(gguf_path: Path, cache_dir: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{FORMAT}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Return the converted directory, converting first if it is not cached yet."""
    target = converted_dir(gguf_path, cache_dir)
    if (target / "config.json").exists():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to safetensors under {target} (once)", flush=True)
    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(**source)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".converting-"))
    try:
        del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.config.gguf_weights = weight_type(gguf_path)
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def weight_type(gguf_path: Path) -> str:
    """The GGUF tensor type (F32, F16, BF16, Q4_1, Q8_0, ...) that holds most of the file's weights."""
    from gguf import GGUFReader

    counts = Counter()
    for tensor in GGUFReader(gguf_path).tensors:
        counts[tensor.tensor_type.name] += int(tensor.n_elements)
    return counts.most_common(1)[0][0]
