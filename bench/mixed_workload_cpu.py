"""bench/mixed_workload.py's comparison run for real on this CPU at small scale, beside its simulation:
the Azure conversation trace's first `--seconds` seconds (arrivals slowed by `--load` to what this CPU
sustains) with `--longs` of its requests given a prompt of 16k-32k tokens, served by bench/trace_replay.py's
engine (a random 2-layer Llama, one rank, 2 threads, float32) under LARS, EDF and FCFS with adaptive
chunking and the non-preemptive baseline (each prompt prefilled whole, first come first served); each
policy measured, then simulated with the engine's profile (`mnemosyne_hpc/sim/`), side by side in one run.

    .venv/bin/python bench/mixed_workload_cpu.py        # about 10 minutes on 2 cores

SLOs as in bench/mixed_workload.py: TBT (4 × this machine's decode-only step of 16 requests, as
bench/trace_replay.py sets it) met by a request whose TBT p99 is within it; TTFT within the scheduler's
prefill deadline. Writes bench/results/mixed_workload_cpu.json: per policy, measured and simulated,
throughput at the SLO, TTFT and latency p50/p99 of short and long requests, short TBT; each adaptive
policy's ratios against the baseline (measured and simulated) next to the paper's 5.7x / 30x / 174x.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import mixed_workload
import trace_replay
from common import write_results
from mnemosyne_hpc.sim.workload import azure_trace, with_long_prompts
from sim_fidelity import simulate

POLICIES = mixed_workload.POLICIES


def outcome(records: list[dict], longs: list[int], perf_model, cfg, window_s: float) -> dict:
    """mixed_workload's classes of one run's records (in stream order)."""
    s = cfg.scheduler

    def ttft_slo(prompt: int) -> float:
        return max(s.deadline_multiplier * perf_model.prefill_time(prompt), s.min_deadline_ms / 1000)

    shorts = [i for i in range(len(records)) if i not in longs]
    return {
        name: mixed_workload.classify(records, members, ttft_slo, s.tbt_slo_ms / 1000, window_s)
        for name, members in (("all", range(len(records))), ("short", shorts), ("long", longs))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0, help="the trace's first seconds replayed")
    parser.add_argument(
        "--load", type=float, default=0.35, help="arrival rate × this (arrival times ÷ it): what 2 cores sustain"
    )
    parser.add_argument("--longs", type=int, default=3, help="requests given a long prompt")
    parser.add_argument("--shortest", type=int, default=16384)
    parser.add_argument("--longest", type=int, default=32768)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()
    from mnemosyne_hpc.config import compose

    trace = azure_trace(mixed_workload.TRACE, seconds=args.seconds)
    stream, longs = with_long_prompts(trace, args.longs / len(trace), args.shortest, args.longest, seed=1)
    stream = [dataclasses.replace(a, time=a.time / args.load) for a in stream]
    longest, window = max(a.prompt_tokens for a in stream), stream[-1].time - stream[0].time
    print(f"{len(stream)} requests over {window:.0f} s; long (arrival s, tokens): "
          + ", ".join(f"({stream[i].time:.1f}, {stream[i].prompt_tokens})" for i in longs), flush=True)  # fmt: skip
    workdir = args.workdir / "mixed_cpu"
    base = trace_replay.engine_overrides(
        args.workdir, longest + max(a.max_tokens for a in stream) + 16, workdir / "profile.json"
    )
    perf_model = trace_replay.profile(base, workdir / "profile.json")
    requests = trace_replay.as_requests(stream, longs)
    shorts = [r for r in requests if r["kind"] == "short"]
    slo_ms = 4e3 * trace_replay.decode_only_step(base, shorts, workdir)
    runs = {}
    for policy in args.policies:
        overrides = base + POLICIES[policy] + [f"scheduler.tbt_slo_ms={slo_ms}", "scheduler.max_num_seqs=64"]
        if policy == "non-preemptive":
            overrides.append(f"scheduler.max_num_batched_tokens={longest}")
        cfg = compose(overrides)
        measured = sorted(
            trace_replay.replay(overrides, requests, workdir, policy)["records"], key=lambda r: r["index"]
        )
        simulated = simulate(overrides, workdir / "profile.json", stream)
        runs[policy] = {
            "measured": outcome(measured, longs, perf_model, cfg, window),
            "simulated": outcome(simulated, longs, perf_model, cfg, window),
        }
        for side, r in runs[policy].items():
            print(
                f"{policy:15s} {side:9s} SLO met {r['all']['met_slo']:5.0%} | short TTFT p50/p99 "
                f"{r['short']['ttft_s']['p50']:.2f}/{r['short']['ttft_s']['p99']:.2f} s, TBT p99 "
                f"{1e3 * r['short']['tbt_s']['p99']:.0f} ms | long TTFT p50 {r['long']['ttft_s']['p50']:.1f} s",
                flush=True,
            )
    ratios = {}
    if "non-preemptive" in runs:
        for side in ("measured", "simulated"):
            found = mixed_workload.ratios({name: r[side] for name, r in runs.items()})
            ratios.update({f"{side}: {key}": value for key, value in found.items()})
    write_results(
        "mixed_workload_cpu.json",
        {
            "benchmark": "mixed_workload_cpu",
            "model": trace_replay.MODEL,
            "dtype": "float32",
            "threads": 2,
            "trace": mixed_workload.TRACE.name,
            "stream": {
                "seconds": args.seconds,
                "load": args.load,
                "requests": len(stream),
                "long": [
                    {"index": i, "arrival_s": stream[i].time, "prompt_tokens": stream[i].prompt_tokens} for i in longs
                ],
            },
            "tbt_slo_ms": slo_ms,
            "policies": {name: POLICIES[name] for name in runs},
            "paper": mixed_workload.PAPER,
            "runs": runs,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
