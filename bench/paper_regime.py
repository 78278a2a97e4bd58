"""The paper's regime on simulated H100 DGX nodes: which layout serves a 1M–10M-token request under a 30 ms
TBT on up to 128 GPUs, how TTFT scales with SPP and TBT with KVP, and a cross-check of the simulator
against a published 1M-token prefill of Llama-3-405B.

    .venv/bin/python bench/paper_regime.py            # a few minutes on 2 cores

1. Llama-3-8B and Llama-3-70B at 1M, 2M, 4M and 10M prompt tokens: every layout on at most 128 GPUs,
   checked for memory and simulated as `python -m mnemosyne_hpc.plan` does (the engine's scheduler, fixed
   chunks of 8192 tokens, 16 decoded tokens); per context the best layout whose TBT p99 meets the SLO.
2. Scaling at TP 8: TTFT against SPP degree 1–16 (KVP 1), and TBT against KVP degree 1–16 (SPP 1). These
   layouts are simulated whether or not their GPUs hold the request's KV (marked `*` where they do not),
   so that every degree has a figure.
3. Llama-3-405B at 1M tokens on 128 GPUs at TP 8 (Meta's context-parallel inference: 77 s on 16 nodes,
   arXiv 2411.01783): the best SPP × KVP layout's TTFT, and what moves it: FlashAttention-3's attention
   efficiency instead of FlashAttention-2's, smaller chunks, the pipeline's drain, the FLOPs per GPU.

Writes results/paper_regime.json and the plots results/paper_regime_ttft.png (TTFT against context, a
line per TP-8 layout of 128 GPUs) and results/paper_regime_tbt_kvp.png (TBT against KVP degree, a line
per context). Installs matplotlib (`requirements-plot.txt`) when missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

from common import RESULTS, ROOT, write_results
from mnemosyne_hpc.config import compose
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.engine.scheduler import chunk_shapes
from mnemosyne_hpc.perf.layout import Layout, LayoutCost, layer_weights, load_hardware, load_shape
from mnemosyne_hpc.sim.planner import evaluate, layout_config, layouts, rank

DEGREES = (1, 2, 4, 8, 16)
META_405B_1M_TTFT_S = 77.0  # Yang et al., Context Parallelism for Scalable Million-Token Inference, arXiv 2411.01783
FA3_EFFICIENCY = 0.75  # FlashAttention-3's forward pass on H100, BF16 (Shah et al., arXiv 2407.08608)


def plan_config(model: str, context: str, gpus: int, slo_ms: float, *overrides: str):
    cfg = compose(
        [
            f"model={model}",
            f"plan.gpus={gpus}",
            f"plan.context={context}",
            f"scheduler.tbt_slo_ms={slo_ms}",
            *overrides,
        ],
        "plan",
    )
    return cfg, load_shape(cfg.model.path)


def row_of(rows: list[dict], cfg, args, hw: dict, layout: Layout) -> dict:
    """The sweep's row of `layout` where it was simulated, else a simulation regardless of memory."""
    found = next((r for r in rows if r["layout"] == str(layout) and "ttft_s" in r), None)
    return found or evaluate(cfg, args, hw, layout, memory_bound=False)


def regime(model: str, contexts: list[str], gpus: int, slo_ms: float, hw: dict) -> dict:
    """Per context: every layout ranked, the best meeting the SLO, and the SPP and KVP series at TP 8."""
    result = {}
    for context in contexts:
        started = time.perf_counter()
        cfg, args = plan_config(model, context, gpus, slo_ms)
        rows = rank([evaluate(cfg, args, hw, layout) for layout in layouts(args, hw, gpus)])
        meeting = [r for r in rows if r["fits"] and r["meets_slo"]]
        fitting = [r for r in rows if r["fits"]]
        result[context] = {
            "tokens": cfg.plan.context_tokens,
            "best": meeting[0] if meeting else None,
            "lowest_tbt": min(fitting, key=lambda r: r["tbt_p99_s"]) if fitting else None,
            "layouts_meeting_slo": len(meeting),
            "layouts_fitting": len(fitting),
            "spp_series": [row_of(rows, cfg, args, hw, Layout(8, d, 1)) for d in DEGREES if 8 * d <= gpus],
            "kvp_series": [row_of(rows, cfg, args, hw, Layout(8, 1, d)) for d in DEGREES if 8 * d <= gpus],
            "layouts": rows,
            "seconds": time.perf_counter() - started,
        }
        print(f"{model} {context}: {len(rows)} layouts in {result[context]['seconds']:.1f} s", flush=True)
    return result


def best_table(model: str, result: dict, slo_ms: float) -> str:
    lines = [
        f"{model}, best layout with TBT p99 <= {slo_ms:g} ms on up to 128 H100s",
        f"{'context':>8} {'layout':<16} {'GPUs':>4} {'TTFT s':>8} {'TBT p50 ms':>10} {'TBT p99 ms':>10} "
        f"{'weights GiB':>11} {'KV GiB/GPU':>10} {'meeting SLO':>11}",
    ]
    for context, c in result.items():
        r, count = c["best"], f"{c['layouts_meeting_slo']}/{c['layouts_fitting']}"
        if r is None:
            low = c["lowest_tbt"]
            lines.append(
                f"{context:>8} none meets it; lowest TBT p99 {1000 * low['tbt_p99_s']:.1f} ms ({low['layout']})"
                f"{'':>9} {count:>11}"
            )
            continue
        lines.append(
            f"{context:>8} {r['layout']:<16} {r['gpus']:>4} {r['ttft_s']:>8.1f} {1000 * r['tbt_p50_s']:>10.1f} "
            f"{1000 * r['tbt_p99_s']:>10.1f} {r['weights_gib']:>11.1f} {r['kv_gib_per_gpu']:>10.1f} {count:>11}"
        )
    return "\n".join(lines)


def scaling(result: dict) -> dict:
    """TTFT efficiency against SPP degree, TTFT(1) / (d · TTFT(d)); TBT speed-up against KVP degree."""
    out = {}
    for context, c in result.items():
        spp, kvp = c["spp_series"], c["kvp_series"]
        out[context] = {
            "spp": [
                {
                    "degree": r["spp"],
                    "ttft_s": r["ttft_s"],
                    "fits": r["fits"],
                    "efficiency": spp[0]["ttft_s"] / (r["spp"] * r["ttft_s"]),
                }
                for r in spp
            ],
            "kvp": [
                {
                    "degree": r["kvp"],
                    "tbt_p50_s": r["tbt_p50_s"],
                    "fits": r["fits"],
                    "speedup": kvp[0]["tbt_p50_s"] / r["tbt_p50_s"],
                }
                for r in kvp
            ],
        }
    return out


def scaling_table(model: str, series: dict) -> str:
    def mark(point):
        return "" if point["fits"] else "*"

    head = "".join(f"{'d=' + str(d):>16}" for d in DEGREES)
    lines = [f"{model}, TTFT s (efficiency) against SPP degree d, TP 8, KVP 1", f"{'context':>8}{head}"]
    for context, s in series.items():
        cells = "".join(f"{p['ttft_s']:>9.1f}{mark(p):1}({p['efficiency']:.2f})" for p in s["spp"])
        lines.append(f"{context:>8}{cells}")
    lines += [f"{model}, TBT p50 ms (speed-up) against KVP degree d, TP 8, SPP 1", f"{'context':>8}{head}"]
    for context, s in series.items():
        cells = "".join(f"{1000 * p['tbt_p50_s']:>9.1f}{mark(p):1}({p['speedup']:.2f})" for p in s["kvp"])
        lines.append(f"{context:>8}{cells}")
    lines.append("* the layout's GPUs do not hold the request's KV: simulated as if they did")
    return "\n".join(lines)


def prefill_flops(args, tokens: int) -> float:
    """Linear layers (2 FLOPs per weight per token) and causal attention (QKᵀ and PV: 2·n² · head_dim per
    query head per layer) of a prompt; the LM head runs for its last token only and is left out."""
    linear = 2 * tokens * args.num_layers * layer_weights(args)
    attention = 2 * tokens * tokens * args.head_dim * args.num_heads * args.num_layers
    return linear + attention


def cross_check_405b(hw: dict, gpus: int) -> dict:
    model, context, tp = "llama3-405b", "1M", 8
    cfg, args = plan_config(model, context, gpus, 30)
    rows = rank([evaluate(cfg, args, hw, layout) for layout in layouts(args, hw, gpus) if layout.tp == tp])
    best = min((r for r in rows if r["fits"]), key=lambda r: r["ttft_s"])
    layout, tokens = Layout(tp, best["spp"], best["kvp"]), cfg.plan.context_tokens
    chunk = min(cfg.scheduler.chunk_size, cfg.scheduler.max_num_batched_tokens)
    fa3 = {**hw, "prefill_attention_efficiency": FA3_EFFICIENCY}
    small, _ = plan_config(model, context, gpus, 30, "scheduler.chunk_size=2048")
    variants = {
        "as profiled": best["ttft_s"],
        f"attention at FlashAttention-3's {FA3_EFFICIENCY:.0%}": evaluate(cfg, args, fa3, layout)["ttft_s"],
        "chunks of 2048 tokens": evaluate(small, args, hw, layout)["ttft_s"],
        "both": evaluate(small, args, fa3, layout)["ttft_s"],
    }
    # One stage's work is every chunk once (a chunk lasts as long as its slowest KVP group); after the last
    # chunk enters, it still crosses spp − 1 stages, each a tick as long as that chunk's stage time (the
    # longest: it attends to the whole prompt).
    perf_model, kvp = LayoutCost(hw, args, layout).perf_model(), KVPLayout.of(layout_config(cfg, layout))

    def stage_time(start: int, size: int) -> float:
        shapes = chunk_shapes(kvp, 0, start, size, False)
        return max(perf_model.batch_time([shape], 0, merged) for _, shape, _, merged in shapes)

    stage_work = sum(stage_time(s, min(chunk, tokens - s)) for s in range(0, tokens, chunk))
    last = stage_time(tokens - chunk, chunk)
    flops = prefill_flops(args, tokens)
    return {
        "model": model,
        "tokens": tokens,
        "gpus": gpus,
        "published_ttft_s": META_405B_1M_TTFT_S,
        "published_source": "Yang et al., Context Parallelism for Scalable Million-Token Inference (arXiv 2411.01783): "
        "1M-token prefill of Llama-3-405B in 77 s on 128 H100s (16 nodes, TP 8 within a node), 93% parallelization "
        "efficiency, 63% FLOPS utilization as the paper counts it",
        "best": best,
        "layouts_tp8": rows,
        "variants_ttft_s": variants,
        "stage_work_s": stage_work,
        "drain_s": (layout.spp - 1) * last,
        "prefill_flops": flops,
        "tflops_per_gpu": {
            "published": flops / (gpus * META_405B_1M_TTFT_S) / 1e12,
            "simulated": flops / (layout.gpus * best["ttft_s"]) / 1e12,
        },
    }


def cross_check_text(c: dict, hw: dict) -> str:
    lines = [
        f"Llama-3-405B, 1M tokens, 128 H100s, TP 8: published {c['published_ttft_s']:.0f} s; simulated "
        f"{c['best']['ttft_s']:.1f} s ({c['best']['layout']}, {c['best']['gpus']} GPUs)",
    ]
    lines += [f"  {name:<40} {ttft:8.1f} s" for name, ttft in c["variants_ttft_s"].items()]
    lines.append(
        f"  one stage's work {c['stage_work_s']:.1f} s + pipeline drain {c['drain_s']:.1f} s "
        f"(the last chunk crossing the other {c['best']['spp'] - 1} stages)"
    )
    peak, rate = hw["bf16_peak_tflops"], c["tflops_per_gpu"]
    lines.append(
        f"  {c['prefill_flops']:.3g} FLOPs: {rate['published']:.0f} TFLOP/s per GPU in the published run "
        f"({rate['published'] / peak:.0%} of {peak} BF16), {rate['simulated']:.0f} ({rate['simulated'] / peak:.0%}) "
        "simulated"
    )
    return "\n".join(lines)


def plot(results: dict, series: dict, slo_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    ttft_figure, ttft_axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for axes, model in zip(ttft_axes[0], models):
        for spp in (16, 8, 4, 2, 1):
            name = str(Layout(8, spp, 16 // spp))
            points = [
                (c["tokens"], r)
                for c in results[model].values()
                for r in c["layouts"]
                if r["layout"] == name and r["fits"]
            ]
            if points:
                line = axes.plot([t for t, _ in points], [r["ttft_s"] for _, r in points], marker="o", label=name)
                missed = [(t, r["ttft_s"]) for t, r in points if not r["meets_slo"]]
                if missed:
                    axes.scatter(*zip(*missed), s=80, facecolors="none", edgecolors=line[0].get_color())
        axes.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (s)", title=f"{model}, 128 H100s")
        axes.legend(fontsize=8, title=f"ringed: TBT over {slo_ms:g} ms", title_fontsize=8)
    ttft_figure.tight_layout()
    ttft_figure.savefig(RESULTS / "paper_regime_ttft.png", dpi=120)

    tbt_figure, tbt_axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for axes, model in zip(tbt_axes[0], models):
        for context, s in series[model].items():
            degrees, tbts = [p["degree"] for p in s["kvp"]], [1000 * p["tbt_p50_s"] for p in s["kvp"]]
            line = axes.plot(degrees, tbts, marker="o", label=context)
            unfit = [(p["degree"], 1000 * p["tbt_p50_s"]) for p in s["kvp"] if not p["fits"]]
            if unfit:
                axes.scatter(*zip(*unfit), marker="x", s=60, color=line[0].get_color())
        axes.axhline(slo_ms, color="grey", linestyle="--", linewidth=1)
        axes.set(xscale="log", yscale="log", xlabel="KVP degree (TP 8, SPP 1)", ylabel="TBT p50 (ms)", title=model)
        axes.set_xticks(DEGREES, [str(d) for d in DEGREES])
        axes.legend(fontsize=8, title="x: KV does not fit", title_fontsize=8)
    tbt_figure.tight_layout()
    tbt_figure.savefig(RESULTS / "paper_regime_tbt_kvp.png", dpi=120)
    plt.close("all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=["llama3-8b", "llama3-70b"])
    parser.add_argument("--contexts", nargs="*", default=["1M", "2M", "4M", "10M"])
    parser.add_argument("--gpus", type=int, default=128)
    parser.add_argument("--tbt-slo-ms", type=float, default=30.0)
    parser.add_argument("--hardware", default="h100-dgx")
    args = parser.parse_args()
    if importlib.util.find_spec("matplotlib") is None:
        requirements = ROOT / "bench" / "requirements-plot.txt"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
    hw = load_hardware(args.hardware)
    results = {model: regime(model, args.contexts, args.gpus, args.tbt_slo_ms, hw) for model in args.models}
    series = {model: scaling(result) for model, result in results.items()}
    check = cross_check_405b(hw, args.gpus)
    for model in args.models:
        print(best_table(model, results[model], args.tbt_slo_ms))
        print(scaling_table(model, series[model]))
    print(cross_check_text(check, hw))
    plot(results, series, args.tbt_slo_ms)
    write_results(
        "paper_regime.json",
        {
            "hardware": hw["name"],
            "gpus": args.gpus,
            "tbt_slo_ms": args.tbt_slo_ms,
            "method": "python -m mnemosyne_hpc.plan's search per model and context (conf/plan.yaml: fixed chunks "
            "of 8192 tokens, FCFS, 16 decoded tokens); scaling series simulated regardless of memory",
            "regime": results,
            "scaling": series,
            "cross_check_405b": check,
        },
    )


if __name__ == "__main__":
    main()
