"""The paper's scheduling claim on a simulated H100 cluster: the Azure LLM conversation trace with a share of
long requests (1M–10M tokens), served by one deployment under four scheduling policies, side by side.

    .venv/bin/python bench/mixed_workload.py           # a few minutes on 2 cores

The stream: the trace's requests of its first `--minutes` minutes (`../shared/data/traces/`, arrival times
and output lengths as recorded, arrival times divided by `--load`), of which a seeded share `--long-share`
get a prompt of log-uniform length in [`--shortest`, `--longest`] (`mnemosyne_hpc/sim/workload.py`). The
deployment: `--model` on one TP × SPP × KVP layout of H100 DGX nodes (default Llama-3-8B, TP 8 × SPP 1 ×
KVP 16 = 128 GPUs, the KV memory its GPUs have left), simulated as the planner does: the engine's own
scheduler on a virtual clock, step times from the layout's performance model (`perf/layout.py`).

Policies (the engine's scheduler knobs; everything else the same):
- `lars`, `edf`, `fcfs`: adaptive chunking under the TBT SLO (chunks up to 8192 tokens), ordered by
  least relative slack, earliest prefill deadline, arrival;
- `non-preemptive`: `chunking=fixed chunk_size=0 priority=fcfs max_num_batched_tokens=<longest prompt>`.
  Each prompt is prefilled whole in one step (split only where it crosses a KVP group's token range, which
  a chunk never does), first come first served; a prefill once started is never split or paused for a
  later request, and the decodes batched with it wait for it, as in a server without chunked prefill
  (vLLM with chunked prefill off needs max_num_batched_tokens >= max_model_len). Unlike a strictly serial
  server, prompts that arrived by the time a step is formed ride in it while the token budget allows.

SLOs: TBT 30 ms (`--tbt-slo-ms`), met by a request whose TBT p99 is within it; TTFT within the scheduler's
own prefill deadline, max(deadline_multiplier × the prompt's predicted prefill time alone, min_deadline_ms).
Throughput at the SLO: requests meeting both per second of the trace window. Per policy: that throughput,
the share meeting the SLOs, TTFT and latency (arrival to last token) p50/p99 of short and long requests,
short requests' TBT; and the ratios of each adaptive policy against the non-preemptive one next to the
paper's 5.7× throughput and 30× / 174× lower median / p99 latency. Writes results/<--name>.json
(default mixed_workload).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from common import ROOT, write_results
from mnemosyne_hpc.config import compose
from mnemosyne_hpc.perf.layout import Layout, LayoutCost, load_hardware, load_shape
from mnemosyne_hpc.sim.planner import layout_config
from mnemosyne_hpc.sim.simulator import Simulator
from mnemosyne_hpc.sim.workload import azure_trace, with_long_prompts

TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
PAPER = {"throughput": 5.7, "median_latency": 30.0, "p99_latency": 174.0}  # the paper's claims, policy over baseline
ADAPTIVE = ["scheduler.chunking=adaptive", "scheduler.max_num_batched_tokens=8192"]
POLICIES = {
    "lars": [*ADAPTIVE, "scheduler.priority=lars"],
    "edf": [*ADAPTIVE, "scheduler.priority=edf"],
    "fcfs": [*ADAPTIVE, "scheduler.priority=fcfs"],
    "non-preemptive": ["scheduler.chunking=fixed", "scheduler.chunk_size=0", "scheduler.priority=fcfs"],
}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def simulate(args, stream, longs: set[int], policy: str, hw: dict) -> dict:
    longest = max(a.prompt_tokens for a in stream)
    overrides = [
        f"model={args.model}",
        f"plan.context={longest}",  # room for the longest request (layout_config)
        f"plan.decode_tokens={max(a.max_tokens for a in stream)}",
        f"scheduler.tbt_slo_ms={args.tbt_slo_ms}",
        f"scheduler.max_num_seqs={args.max_num_seqs}",
        *POLICIES[policy],
    ]
    if policy == "non-preemptive":
        overrides.append(f"scheduler.max_num_batched_tokens={longest}")
    cfg = compose(overrides, "plan")
    shape, layout = load_shape(cfg.model.path), Layout(*args.layout)
    cost, cfg = LayoutCost(hw, shape, layout), layout_config(cfg, layout)
    perf_model = cost.perf_model()
    started = time.perf_counter()
    result = Simulator(cfg, shape, perf_model, num_blocks=cost.kv_blocks(cfg.cache.block_size)).run(stream)
    wall = time.perf_counter() - started
    s = cfg.scheduler

    def ttft_slo(prompt: int) -> float:  # the scheduler's prefill deadline (engine/priority.py)
        return max(s.deadline_multiplier * perf_model.prefill_time(prompt), s.min_deadline_ms / 1000)

    window = max(a.time for a in stream) - min(a.time for a in stream)
    out = {"steps": len(result.steps), "simulation_wall_s": wall, "summary": result.summary}
    for name, members in (("all", range(len(stream))), ("short", [i for i in range(len(stream)) if i not in longs])):
        out[name] = classify(result.records, members, ttft_slo, s.tbt_slo_ms / 1000, window)
    out["long"] = classify(result.records, sorted(longs), ttft_slo, s.tbt_slo_ms / 1000, window)
    return out


def classify(records: list[dict], members, ttft_slo, tbt_slo_s: float, window_s: float) -> dict:
    """One class of requests: who met the SLOs, throughput at the SLO, TTFT, latency and TBT."""
    rows = [records[i] for i in members]
    met = [
        r["ttft_s"] <= ttft_slo(r["prompt_tokens"]) and (not r["tbt_s"] or np.percentile(r["tbt_s"], 99) <= tbt_slo_s)
        for r in rows
    ]
    return {
        "requests": len(rows),
        "met_slo": sum(met) / len(rows) if rows else None,
        "throughput_at_slo_rps": sum(met) / window_s,
        "ttft_s": percentiles([r["ttft_s"] for r in rows]),
        "latency_s": percentiles([r["finish_s"] - r["arrival_s"] for r in rows]),
        "tbt_s": percentiles([t for r in rows for t in r["tbt_s"]]),
        "preemptions": sum(r["preemptions"] for r in rows),
    }


def table(runs: dict) -> str:
    def pair(d, scale=1.0):
        return "/".join("-" if d[k] is None else f"{scale * d[k]:.3g}" for k in ("p50", "p99"))

    lines = [
        f"{'policy':<15} {'SLO met':>7} {'req/s at SLO':>12} {'short TTFT s':>13} {'short latency s':>15} "
        f"{'short TBT ms':>12} {'long TTFT s':>13} {'long latency s':>14} {'steps':>7} {'wall s':>6}"
    ]
    for name, r in runs.items():
        a, sh, lo = r["all"], r["short"], r["long"]
        lines.append(
            f"{name:<15} {a['met_slo']:>7.1%} {a['throughput_at_slo_rps']:>12.2f} {pair(sh['ttft_s']):>13} "
            f"{pair(sh['latency_s']):>15} {pair(sh['tbt_s'], 1000):>12} {pair(lo['ttft_s']):>13} "
            f"{pair(lo['latency_s']):>14} {r['steps']:>7} {r['simulation_wall_s']:>6.0f}"
        )
    return "\n".join(lines)


def ratios(runs: dict, baseline: str = "non-preemptive") -> dict:
    """Each adaptive policy against the baseline: throughput at the SLO (policy / baseline) and latency
    (baseline / policy), of all requests and of each class."""
    base, out = runs[baseline], {}
    for name, r in runs.items():
        if name == baseline:
            continue
        out[f"{name} throughput at SLO"] = r["all"]["throughput_at_slo_rps"] / max(
            base["all"]["throughput_at_slo_rps"], 1e-9
        )
        for group in ("all", "short", "long"):
            for q, label in (("p50", "median"), ("p99", "p99")):
                out[f"{name} {label} latency, {group}"] = base[group]["latency_s"][q] / r[group]["latency_s"][q]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--layout", type=int, nargs=3, default=[8, 1, 16], metavar=("TP", "SPP", "KVP"))
    parser.add_argument("--hardware", default="h100-dgx")
    parser.add_argument("--minutes", type=float, default=10.0, help="the trace's first minutes replayed")
    parser.add_argument("--load", type=float, default=1.0, help="arrival rate × this (arrival times ÷ it)")
    parser.add_argument("--long-share", type=float, default=0.001, help="share of requests given a long prompt")
    parser.add_argument("--shortest", type=int, default=1_000_000)
    parser.add_argument("--longest", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tbt-slo-ms", type=float, default=30.0)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--name", default="mixed_workload", help="results/<name>.json")
    args = parser.parse_args()
    hw = load_hardware(args.hardware)

    trace = azure_trace(TRACE, seconds=60 * args.minutes)
    stream, longs = with_long_prompts(trace, args.long_share, args.shortest, args.longest, args.seed)
    stream = [dataclasses.replace(a, time=a.time / args.load) for a in stream]
    print(
        f"{len(stream)} requests over {stream[-1].time:.0f} s; long prompts (arrival s, tokens): "
        + ", ".join(f"({stream[i].time:.0f}, {stream[i].prompt_tokens:,})" for i in longs),
        flush=True,
    )
    runs = {}
    for policy in args.policies:
        runs[policy] = simulate(args, stream, set(longs), policy, hw)
        print(table({policy: runs[policy]}).splitlines()[-1], flush=True)
    print(table(runs))
    found = ratios(runs) if "non-preemptive" in runs else {}
    write_results(
        f"{args.name}.json",
        {
            "hardware": hw["name"],
            "model": args.model,
            "layout": str(Layout(*args.layout)),
            "trace": TRACE.name,
            "stream": {
                "minutes": args.minutes,
                "load": args.load,
                "requests": len(stream),
                "long_share": args.long_share,
                "long_range": [args.shortest, args.longest],
                "seed": args.seed,
                "long": [
                    {"index": i, "arrival_s": stream[i].time, "prompt_tokens": stream[i].prompt_tokens} for i in longs
                ],
            },
            "tbt_slo_ms": args.tbt_slo_ms,
            "max_num_seqs": args.max_num_seqs,
            "policies": {name: POLICIES[name] for name in runs},
            "paper": PAPER,
            "runs": runs,
            "ratios": found,
        },
    )


if __name__ == "__main__":
    main()
