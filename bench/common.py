"""Helpers shared by the benchmarks: a random-weight model of a chosen size, and timed engine runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


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


def run_generate(ranks: int, overrides: list[str], requests: list[dict], workdir: Path, threads: int,
                 bind: bool) -> list[dict]:
    """mpirun -n ranks python -m mnemosyne_hpc.generate; each rank uses `threads` threads,
    pinned one core per rank when `bind`. Returns the output records."""
    workdir.mkdir(parents=True, exist_ok=True)
    prompts, out = workdir / "in.jsonl", workdir / "out.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in requests))
    mpirun = str(Path(sys.executable).parent / "mpirun")
    command = [mpirun, *(["-bind-to", "core"] if bind else []), "-n", str(ranks), sys.executable, "-m",
               "mnemosyne_hpc.generate", *overrides, f"generate.input={prompts}", f"generate.output={out}",
               "generate.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in out.read_text().splitlines()]
