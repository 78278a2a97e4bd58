"""Decode TBT and TTFT of one long-context request: KVP=2 (two ranks, one core each) vs KVP=1 (one
rank, one core), side by side on the same random-weight model and prompt.

    .venv/bin/python bench/kvp.py --tokens 131072

Writes bench/results/kvp_<tokens>tok.json: TTFT, median and p90 decode TBT, the KV bytes each rank
holds for the request, and the KVP=2 / KVP=1 ratios.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import llama, long_prompt_overrides, random_llama, random_prompt, run_generate, write_results

# Few layers and small projections, but 4 KB of KV per token (4 KV heads × 128 dims, 2 layers, bf16),
# so that, as in real long-context models, reading the KV dominates a decode step.
MODEL = llama(2, 256, 512, 4, 4, 128, vocab=1024, positions=1 << 20, rope_theta=1e7)
DTYPE_BYTES = 2  # bfloat16
BLOCK_SIZE = 128


def kv_bytes_per_block() -> int:
    return 2 * MODEL["num_hidden_layers"] * MODEL["num_key_value_heads"] * MODEL["head_dim"] * BLOCK_SIZE * DTYPE_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=131072, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=32, help="decode steps timed")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()

    model_dir = random_llama(args.workdir / "llama-kvp-2x256-hd128", **MODEL)
    prompt = random_prompt(args.tokens, 0, MODEL["vocab_size"])
    request = {"prompt_token_ids": prompt, "max_tokens": args.decode + 1, "ignore_eos": True}
    max_model_len = args.tokens + args.decode + 1
    kv_gib = 2 * max_model_len * kv_bytes_per_block() / BLOCK_SIZE / 2**30
    common = long_prompt_overrides(
        model_dir, max_model_len, args.chunk, 3600, block_size=BLOCK_SIZE, kv_memory_gib=f"{kv_gib:.3f}"
    )
    results = {}
    for kvp in (1, 2):
        output = run_generate(
            kvp, common + [f"parallel.kvp={kvp}"], [request], args.workdir / f"kvp{kvp}", threads=1, bind=True
        )[0]
        tbt = sorted(output["tbt_s"])
        kv_bytes = {
            f"rank{g}": blocks * kv_bytes_per_block() for g, blocks in zip(output["kvp_groups"], output["kv_blocks"])
        }
        results[f"kvp{kvp}"] = {
            "ranks": kvp,
            "ttft_s": output["ttft_s"],
            "tbt_median_s": statistics.median(tbt),
            "tbt_p90_s": tbt[int(0.9 * (len(tbt) - 1))],
            "tbt_s": output["tbt_s"],
            "kv_bytes_per_rank": kv_bytes,
        }
        print(
            f"kvp={kvp}: TTFT {output['ttft_s']:.2f} s, TBT median {1e3 * statistics.median(tbt):.2f} ms, "
            f"KV bytes per rank {kv_bytes}",
            flush=True,
        )
    one, two = results["kvp1"], results["kvp2"]
    ratios = {
        "tbt_median kvp2/kvp1": two["tbt_median_s"] / one["tbt_median_s"],
        "ttft kvp2/kvp1": two["ttft_s"] / one["ttft_s"],
        "max kv_bytes_per_rank kvp2/kvp1": max(two["kv_bytes_per_rank"].values())
        / max(one["kv_bytes_per_rank"].values()),
    }
    write_results(
        f"kvp_{args.tokens}tok.json",
        {
            "benchmark": "kvp_long_context",
            "prompt_tokens": args.tokens,
            "decode_steps": args.decode,
            "chunk_size": args.chunk,
            "model": MODEL,
            "dtype": "bfloat16",
            "cores_per_rank": 1,
            "runs": results,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
