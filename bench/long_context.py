"""The longest exact prefill this CPU completes within ten minutes: one prompt of a million tokens
(by default) through a tiny random-weight Llama, then a few decoded tokens.

    .venv/bin/python bench/long_context.py --tokens 1048576

Attention is the whole cost at this length (2·L²·heads·head_dim FLOPs per layer), so the model has
two layers with one 64-wide query head and one KV head each: 256 bytes of KV per token and layer.
`--check` also runs Hugging Face transformers on the same prompt and compares the logits of the
first generated token; it records too how much those logits change when the first quarter of the
prompt is dropped (with random weights, hardly at all: distant context averages out, so this
check cannot show long-range errors, which the KVP and needle tests cover).
Writes bench/results/long_context_<tokens>tok.json: TTFT, decode TBT, and the KV memory the
request held (its blocks × bytes per block).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import llama, long_prompt_overrides, random_llama, random_prompt, run_in_process, write_results

MODEL = llama(2, 256, 512, 1, 1, 64, vocab=1024, positions=1 << 23, rope_theta=1e8, initializer_range=0.2)
BLOCK_SIZE = 1024
DTYPE_BYTES = 2  # bfloat16


def kv_bytes_per_block() -> int:
    return 2 * MODEL["num_hidden_layers"] * MODEL["num_key_value_heads"] * MODEL["head_dim"] * BLOCK_SIZE * DTYPE_BYTES


def reference_logits(model_dir: Path, prompt: list[int]):
    """transformers' logits of the token after `prompt` (its flash CPU attention, no mask tensor)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 20, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=8, help="tokens decoded after the prompt")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--check", action="store_true", help="compare the first token's logits with transformers")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()

    model_dir = random_llama(args.workdir / "llama-2x256-1head-init0.2", **MODEL)
    prompt = random_prompt(args.tokens, 0, MODEL["vocab_size"])
    max_model_len = args.tokens + args.decode + 1
    kv_gib = 1.05 * max_model_len * kv_bytes_per_block() / BLOCK_SIZE / 2**30
    overrides = long_prompt_overrides(
        model_dir, max_model_len, args.chunk, 7200, block_size=BLOCK_SIZE, kv_memory_gib=f"{kv_gib:.3f}"
    )
    done = {}

    def leader(engine) -> None:
        request_id = engine.add_request(prompt, {"max_tokens": args.decode + 1, "ignore_eos": True})
        done["request"] = request = engine.requests[request_id]
        with tqdm(total=args.tokens, desc="prefill", unit="tok") as bar:
            while engine.has_unfinished:
                engine.step()
                bar.update(min(request.num_computed, args.tokens) - bar.n)
        done["logits"] = engine.logits[request_id][0]

    started = time.perf_counter()
    run_in_process(overrides, leader, record_logits=True)
    wall = time.perf_counter() - started
    request = done["request"]
    kv_bytes = [len(table) * kv_bytes_per_block() for table in request.block_tables]
    tbt = statistics.median(request.tbt_s)
    print(
        f"{args.tokens} tokens: TTFT {request.ttft_s:.1f} s, TBT median {tbt * 1e3:.1f} ms, "
        f"KV {sum(kv_bytes) / 2**20:.0f} MiB",
        flush=True,
    )
    record = {
        "benchmark": "long_context",
        "prompt_tokens": args.tokens,
        "model": MODEL,
        "dtype": "bfloat16",
        "threads": torch.get_num_threads(),
        "chunk_size": args.chunk,
        "ttft_s": request.ttft_s,
        "tbt_s": request.tbt_s,
        "tbt_median_s": tbt,
        "wall_s": wall,
        "token_ids": request.output_token_ids,
        "kv_bytes": sum(kv_bytes),
        "kv_bytes_per_token": kv_bytes_per_block() // BLOCK_SIZE,
    }
    if args.check:
        started = time.perf_counter()
        reference = reference_logits(model_dir, prompt)
        ours = torch.as_tensor(done["logits"]).float()
        # How much the answer depends on distant context at all: random weights average it away.
        without_first_quarter = reference_logits(model_dir, prompt[args.tokens // 4 :])
        record["check"] = {
            "transformers_s": time.perf_counter() - started,
            "max_abs_logit_diff": (ours - reference).abs().max().item(),
            "max_abs_logit": reference.abs().max().item(),
            "same_first_token": int(reference.argmax()) == request.output_token_ids[0],
            "max_abs_logit_change_without_first_quarter": (without_first_quarter - reference).abs().max().item(),
        }
        print(f"transformers: {record['check']}", flush=True)
    write_results(f"long_context_{args.tokens}tok.json", record)


if __name__ == "__main__":
    main()
