"""TTFT of one long prompt: SPP=2 vs SPP=1 vs plain PP=2 (one core per rank), and one 2-core process.

    .venv/bin/python bench/spp.py --tokens 16384

Writes bench/results/spp_<tokens>tok_chunk<chunk>.json. All runs use the same random-weight Llama (bf16),
prompt and chunk size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import llama, random_llama, random_prompt, run_generate, write_results

MODEL = llama(8, 1024, 2816, 16, 4, vocab=32000, positions=1 << 16)

RUNS = [  # name, ranks, threads per rank, pin one core per rank, overrides
    ("spp1_1core", 1, 1, True, ["parallel.spp=1"]),
    ("spp2_2x1core", 2, 1, True, ["parallel.spp=2", "scheduler.pipeline=spp"]),
    ("plain_pp2_2x1core", 2, 1, True, ["parallel.spp=2", "scheduler.pipeline=plain"]),
    ("spp1_2cores", 1, 2, False, ["parallel.spp=1"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()

    model_dir = random_llama(args.workdir / "llama-8x1024", **MODEL)
    prompt = random_prompt(args.tokens, 0, MODEL["vocab_size"])
    request = {"prompt_token_ids": prompt, "max_tokens": 1, "ignore_eos": True}
    common = [
        "model=hf",
        f"model.path={model_dir}",
        "model.dtype=bfloat16",
        f"cache.max_model_len={args.tokens + 16}",
        "scheduler.chunking=fixed",
        "scheduler.priority=fcfs",
        f"scheduler.chunk_size={args.chunk}",
        f"scheduler.max_num_batched_tokens={args.chunk}",
        "parallel.timeout_s=1800",
    ]
    results = {}
    for name, ranks, threads, bind, overrides in RUNS:
        started = time.perf_counter()
        output = run_generate(ranks, common + overrides, [request], args.workdir / name, threads, bind)[0]
        results[name] = {
            "ttft_s": output["ttft_s"],
            "ranks": ranks,
            "threads_per_rank": threads,
            "wall_s": time.perf_counter() - started,
        }
        print(f"{name:20s} TTFT {output['ttft_s']:8.2f} s", flush=True)
    base = results["spp1_1core"]["ttft_s"]
    ratios = {f"{name}/spp1_1core": r["ttft_s"] / base for name, r in results.items()}
    ratios["spp2_2x1core/spp1_2cores"] = results["spp2_2x1core"]["ttft_s"] / results["spp1_2cores"]["ttft_s"]
    ratios["spp2_2x1core/plain_pp2_2x1core"] = (
        results["spp2_2x1core"]["ttft_s"] / results["plain_pp2_2x1core"]["ttft_s"]
    )
    write_results(
        f"spp_{args.tokens}tok_chunk{args.chunk}.json",
        {
            "benchmark": "spp_ttft",
            "prompt_tokens": args.tokens,
            "chunk_size": args.chunk,
            "model": MODEL,
            "dtype": "bfloat16",
            "runs": results,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
