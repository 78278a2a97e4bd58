"""Prefix caching: one long document, then questions about it one after another, with the prefix cache
on and off, at KVP=1 (one rank) and KVP=2 (two ranks), side by side in one run. With the cache on, the
first question prefills the document; every later one finds its complete blocks cached.

    .venv/bin/python bench/prefix_cache.py --tokens 65536 --questions 5

Writes bench/results/prefix_cache_<tokens>tok.json: each question's TTFT and cached tokens per run,
and the ratios TTFT of questions 2.. over question 1 (cache on), and cache on over off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, llama, long_prompt_overrides, random_llama, random_prompt, run_in_process, write_results

MODEL = llama(2, 256, 512, 4, 4, 64, vocab=1024, positions=1 << 20, rope_theta=1e7)


def ask_in_turn(spec: dict) -> list[dict]:
    """Rank 0: each request once the one before it finished; its TTFT and cached tokens."""
    answers = []

    def leader(engine) -> None:
        for request in spec["requests"]:
            engine.add_request(request, {"max_tokens": spec["max_tokens"], "ignore_eos": True})
            while engine.has_unfinished:
                for done in engine.step().finished:
                    answers.append(
                        {
                            "ttft_s": done.ttft_s,
                            "cached_tokens": done.cached_tokens,
                            "prompt_tokens": len(done.prompt_token_ids),
                        }
                    )

    run_in_process(spec["overrides"], leader)
    return answers


def run(ranks: int, spec: dict, workdir: Path) -> list[dict]:
    """`ask_in_turn` on `ranks` ranks under mpirun, one core each."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps(spec))
    mpirun = str(Path(sys.executable).parent / "mpirun")
    command = [
        mpirun,
        "-bind-to",
        "core",
        "-n",
        str(ranks),
        sys.executable,
        __file__,
        "--worker",
        str(spec_path),
        str(result_path),
    ]
    subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(result_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="document tokens")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--question-tokens", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench/prefix-cache"))
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec_path, result_path = args.worker
        answers = ask_in_turn(json.loads(spec_path.read_text()))
        if answers:  # rank 0
            result_path.write_text(json.dumps(answers))
        return

    model_dir = random_llama(args.workdir.parent / "llama-prefix-2x256", **MODEL)
    document = random_prompt(args.tokens, 0, MODEL["vocab_size"])
    requests = [
        document + random_prompt(args.question_tokens, 1 + i, MODEL["vocab_size"]) for i in range(args.questions)
    ]
    max_model_len = args.tokens + args.question_tokens + 8
    runs = {}
    for kvp in (1, 2):
        for caching in (True, False):
            caching_knob = str(caching).lower()
            overrides = long_prompt_overrides(
                model_dir, max_model_len, args.chunk, 3600, kv_memory_gib=1, prefix_caching=caching_knob
            ) + [f"parallel.kvp={kvp}"]
            name = f"kvp{kvp}_{'cache' if caching else 'nocache'}"
            answers = run(kvp, {"overrides": overrides, "requests": requests, "max_tokens": 2}, args.workdir / name)
            runs[name] = answers
            print(
                f"{name}: TTFT " + ", ".join(f"{a['ttft_s']:.2f} s ({a['cached_tokens']} cached)" for a in answers),
                flush=True,
            )
    ratios = {}
    for kvp in (1, 2):
        cache, nocache = runs[f"kvp{kvp}_cache"], runs[f"kvp{kvp}_nocache"]
        later = statistics.median(a["ttft_s"] for a in cache[1:])
        ratios[f"kvp{kvp} later questions / first, cache on"] = later / cache[0]["ttft_s"]
        ratios[f"kvp{kvp} later questions cache on / off"] = later / statistics.median(a["ttft_s"] for a in nocache[1:])
    write_results(
        f"prefix_cache_{args.tokens}tok.json",
        {
            "benchmark": "prefix_cache",
            "document_tokens": args.tokens,
            "questions": args.questions,
            "question_tokens": args.question_tokens,
            "chunk_size": args.chunk,
            "model": MODEL,
            "dtype": "bfloat16",
            "cores_per_rank": 1,
            "runs": runs,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
