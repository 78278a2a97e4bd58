"""Sweep parallel layouts × context lengths × chunk policies with mpirun; TTFT and TBT as JSON and plots.

    .venv/bin/python bench/sweep.py                                   # 4 layouts on 1–2 ranks, 1k–16k
    .venv/bin/python bench/sweep.py --layouts tp1 kvp2 spp2 --contexts 4096 32768 --policies fixed adaptive

Each point is one request (a random prompt of the given length, then `--decode` greedy tokens) on a
random 2-layer Llama, run by `mpirun -n <ranks> python -m mnemosyne_hpc.generate` with one core per
rank. Writes bench/results/sweep.json and bench/results/sweep_ttft.png, sweep_tbt.png (one line per
layout and policy, against context length).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT, llama, random_llama, random_prompt, run_generate, write_results

MODEL = llama(2, 256, 512, 4, 2, 64, vocab=1024, positions=1 << 17)
LAYOUTS = {  # name → (ranks, overrides)
    "tp1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "spp2": (2, ["parallel.spp=2"]),
    "kvp2": (2, ["parallel.kvp=2"]),
    "tp2-kvp2": (4, ["parallel.tp=2", "parallel.kvp=2"]),
}
POLICIES = {
    "fixed": ["scheduler.chunking=fixed", "scheduler.priority=fcfs", "scheduler.chunk_size=1024"],
    "adaptive": ["scheduler.chunking=adaptive", "scheduler.priority=lars", "scheduler.tbt_slo_ms=200"],
}


def plot(points: list[dict], metric: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for layout, policy in sorted({(p["layout"], p["policy"]) for p in points}):
        line = sorted((p["context"], p[metric]) for p in points if (p["layout"], p["policy"]) == (layout, policy))
        axes.plot([c for c, _ in line], [1000 * v for _, v in line], marker="o", label=f"{layout} ({policy})")
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="context length (tokens)",
        ylabel=f"{label} (ms)",
        title=f"{label} against context length",
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layouts", nargs="*", default=["tp1", "tp2", "spp2", "kvp2"], choices=list(LAYOUTS))
    parser.add_argument("--contexts", nargs="*", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--policies", nargs="*", default=["fixed", "adaptive"], choices=list(POLICIES))
    parser.add_argument("--decode", type=int, default=16, help="greedy tokens after each prompt")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()
    if importlib.util.find_spec("matplotlib") is None:
        requirements = ROOT / "bench" / "requirements-plot.txt"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)

    model_dir = random_llama(args.workdir / "llama-sweep-2x256", **MODEL)
    points = []
    for context in args.contexts:
        prompt = random_prompt(context, context, MODEL["vocab_size"])
        request = {"prompt_token_ids": prompt, "max_tokens": args.decode, "ignore_eos": True}
        common = [
            "model=hf",
            f"model.path={model_dir}",
            "model.dtype=bfloat16",
            f"cache.max_model_len={context + args.decode}",
            "cache.kv_memory_gib=0.5",
            "parallel.timeout_s=600",
        ]
        for layout in args.layouts:
            ranks, overrides = LAYOUTS[layout]
            for policy in args.policies:
                output = run_generate(
                    ranks,
                    common + overrides + POLICIES[policy],
                    [request],
                    args.workdir / "sweep" / f"{layout}-{policy}-{context}",
                    threads=1,
                    bind=True,
                )[0]
                point = {
                    "layout": layout,
                    "ranks": ranks,
                    "policy": policy,
                    "context": context,
                    "ttft_s": output["ttft_s"],
                    "tbt_median_s": statistics.median(output["tbt_s"]),
                }
                points.append(point)
                print(
                    f"{layout:9s} {policy:8s} {context:7d} tokens: TTFT {1000 * point['ttft_s']:8.1f} ms, "
                    f"TBT {1000 * point['tbt_median_s']:6.2f} ms",
                    flush=True,
                )
    plot(points, "ttft_s", "TTFT", RESULTS / "sweep_ttft.png")
    plot(points, "tbt_median_s", "median TBT", RESULTS / "sweep_tbt.png")
    write_results(
        "sweep.json",
        {
            "model": MODEL,
            "dtype": "bfloat16",
            "cores_per_rank": 1,
            "decode": args.decode,
            "layouts": {k: LAYOUTS[k] for k in args.layouts},
            "policies": {k: POLICIES[k] for k in args.policies},
            "points": points,
            "plots": ["sweep_ttft.png", "sweep_tbt.png"],
        },
    )


if __name__ == "__main__":
    main()
