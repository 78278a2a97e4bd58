"""Replay the Azure LLM conversation trace with one long request injected, under several scheduler
policies, side by side in one run.

    .venv/bin/python bench/trace_replay.py                      # about 13 minutes on 2 cores

1. Profiles the model on this machine (`python -m mnemosyne_hpc.profile`, full grid) and records
   the performance model's held-out error.
2. Measures the decode-only step time D: 16 requests of the trace, all decoding, no prefill.
3. Replays the first `--requests` requests of the trace (arrival times scaled by `--stretch`, so
   that this CPU sustains the rate) plus a `--long`-token request arriving at `--long-at` seconds:
   once per fixed chunk size (256, 1024, 4096 tokens; FCFS), and with adaptive chunking under FCFS
   and LARS at each TBT SLO of `--slo-factors` × D.

Writes bench/results/trace_conv_<long>tok.json: per run the TBT p50/p99 of the short requests (all
their tokens, and those produced while the long prompt was being prefilled), TTFT of the long
request and of the short ones, throughput, preemptions and the long prompt's chunk sizes; per SLO,
each adaptive run's TBT p99 while the long prefill ran over the SLO and its long TTFT over the best
fixed-chunk run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, llama, random_llama, write_results
from mnemosyne_hpc.sim.workload import azure_trace

MODEL = llama(2, 512, 2048, 4, 1, 64, vocab=8192, positions=1 << 17, rope_theta=1e6)
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
FIXED = {
    f"fixed{size}-fcfs": {"chunking": "fixed", "chunk_size": size, "priority": "fcfs"} for size in (256, 1024, 4096)
}
ADAPTIVE = {
    "adaptive-fcfs": {"chunking": "adaptive", "priority": "fcfs"},
    "adaptive-lars": {"chunking": "adaptive", "priority": "lars"},
}


def engine_overrides(workdir: Path, max_model_len: int, profile_path: Path | None = None) -> list[str]:
    """The replays' engine: the random MODEL (made once under `workdir`) in float32, its profile at `profile_path`
    (none: for fixed chunks under FCFS, which read no profile)."""
    model_dir = random_llama(workdir / "llama-trace-2x512", **MODEL)
    return [
        "model=hf",
        f"model.path={model_dir}",
        "model.dtype=float32",  # as recorded (the checkpoint is bfloat16: auto would take it)
        f"cache.max_model_len={max_model_len}",
        "cache.kv_memory_gib=1",
        "scheduler.max_num_batched_tokens=8192",
        "scheduler.max_num_seqs=64",
        *([f"scheduler.profile={profile_path}"] if profile_path else []),
        "parallel.timeout_s=3600",
    ]


def profile(base: list[str], path: Path, again: bool = False):
    """The performance model of the replays' engine (one rank, 2 threads), taken now if `again` or none is stored."""
    from mnemosyne_hpc.perf.model import PerfModel

    if again or not path.exists():
        print("profiling", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        subprocess.run([sys.executable, "-m", "mnemosyne_hpc.profile", *base], cwd=ROOT, env=env, check=True)
    return PerfModel.load(path)


def as_requests(arrivals, longs=()) -> list[dict]:
    """A stream (`mnemosyne_hpc/sim/workload.py`) as replay requests, `longs` (indices) of kind "long":
    seeded random prompt tokens of each arrival's length."""
    rng = random.Random(0)
    return [
        {
            "kind": "long" if i in longs else "short",
            "index": i,
            "arrival_s": a.time,
            "prompt_token_ids": [rng.randrange(3, MODEL["vocab_size"]) for _ in range(a.prompt_tokens)],
            "max_tokens": a.max_tokens,
        }
        for i, a in enumerate(arrivals)
    ]


def as_arrivals(requests: list[dict]) -> list:
    """Replay requests as the simulator's stream (`mnemosyne_hpc/sim/simulator.py`)."""
    from mnemosyne_hpc.sim.simulator import Arrival

    return [Arrival(r["arrival_s"], len(r["prompt_token_ids"]), r["max_tokens"]) for r in requests]


def read_trace(count: int, stretch: float) -> list[dict]:
    """The trace's first `count` requests, arrival times × `stretch`."""
    return as_requests([dataclasses.replace(a, time=a.time * stretch) for a in azure_trace(TRACE)[:count]])


def long_request(tokens: int, at: float) -> dict:
    """The long request injected into a replay: `tokens` seeded random prompt tokens, 16 to generate."""
    rng = random.Random(1)
    prompt = [rng.randrange(3, MODEL["vocab_size"]) for _ in range(tokens)]
    return {"kind": "long", "arrival_s": at, "max_tokens": 16, "prompt_token_ids": prompt}


def is_split(request, tokens: int, block_size: int) -> bool:
    """Whether the KV of a request's first `tokens` positions lies in more than one run of consecutive
    blocks (one KVP group)."""
    (table,) = request.block_tables
    blocks = table[: -(-tokens // block_size)]
    return blocks != list(range(blocks[0], blocks[0] + len(blocks)))


def worker(spec_path: str) -> None:
    """One replay in this process (rank 0 of a one-rank job): requests join at their arrival times."""
    from mnemosyne_hpc.config import compose
    from mnemosyne_hpc.engine.metrics import request_record
    from mnemosyne_hpc.runtime import run

    spec = json.loads(Path(spec_path).read_text())
    cfg = compose(spec["overrides"])

    def leader(engine) -> None:
        pending = sorted(spec["requests"], key=lambda r: r["arrival_s"])
        block_size = cfg.cache.block_size
        kinds, indices, records, long_chunks, steps = {}, {}, [], [], []
        start = time.perf_counter()
        while pending or engine.has_unfinished:
            now = time.perf_counter() - start
            while pending and pending[0]["arrival_s"] <= now:
                r = pending.pop(0)
                rid = engine.add_request(
                    prompt_token_ids=r["prompt_token_ids"],
                    arrival=start + r["arrival_s"],
                    sampling={"max_tokens": r["max_tokens"], "ignore_eos": True},
                )
                kinds[rid] = r["kind"]
                indices[rid] = r.get("index")
            if not engine.has_unfinished:
                time.sleep(min(pending[0]["arrival_s"] - now, 0.05))
                continue
            step_start = time.perf_counter()
            finished = engine.step().finished
            for request in finished:
                records.append(
                    {"kind": kinds[request.id], "index": indices[request.id], **request_record(request, start)}
                )
            entering = engine.last_plan.entering
            requests = {**engine.requests, **{r.id: r for r in finished}}
            steps.append(
                {
                    "admitted_s": now,  # when the loop last took arrivals in, before this step
                    "start_s": step_start - start,
                    "seconds": time.perf_counter() - step_start,
                    "predicted_s": engine.scheduler.predicted_time(),
                    "decodes": sum(kinds[c.request_id] == "short" and len(c.token_ids) == 1 for c in entering),
                    "tokens": sum(len(c.token_ids) for c in entering),
                    "split_decodes": sum(
                        len(c.token_ids) == 1 and is_split(requests[c.request_id], c.start_pos + 1, block_size)
                        for c in entering
                    ),
                }
            )
            long_chunks += [[c.start_pos, len(c.token_ids)] for c in entering if kinds[c.request_id] == "long"]
        Path(spec["out"]).write_text(json.dumps({"records": records, "long_chunks": long_chunks, "steps": steps}))

    run(cfg, leader)


def replay(overrides: list[str], requests: list[dict], workdir: Path, name: str) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec.write_text(json.dumps({"overrides": overrides, "requests": requests, "out": str(out)}))
    result = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"replay {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def decode_only_step(base: list[str], shorts: list[dict], workdir: Path) -> float:
    """Seconds of a decode-only step: the median step of 16 of the trace's requests all decoding."""
    decode_requests = [{**r, "arrival_s": 0.0, "max_tokens": 64} for r in shorts[:16]]
    decode_run = replay(
        base + ["scheduler.chunking=fixed", "scheduler.priority=fcfs"], decode_requests, workdir, "decode-only"
    )
    decode_steps = [s["seconds"] for s in decode_run["steps"] if s["decodes"] == s["tokens"] == 16]
    if not decode_steps:
        raise ValueError(f"no step decoded 16 requests: replay at least 16 of the trace's (got {len(shorts)})")
    decode_step_s = float(np.median(decode_steps))
    print(
        f"decode-only step {1e3 * decode_step_s:.1f} ms (median of {len(decode_steps)} steps of 16 decodes)", flush=True
    )
    return decode_step_s


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def summarize(run: dict) -> dict:
    shorts = [r for r in run["records"] if r["kind"] == "short"]
    long = next(r for r in run["records"] if r["kind"] == "long")
    long_prefill = (long["arrival_s"], long["first_token_s"])
    tbt_all = [t for r in shorts for t in r["tbt_s"]]
    # TBTs of short requests whose token arrived while the long prompt was being prefilled
    tbt_during = [
        t
        for r in shorts
        for t, at in zip(r["tbt_s"], r["first_token_s"] + np.cumsum(r["tbt_s"]))
        if long_prefill[0] <= at <= long_prefill[1]
    ]
    duration = max(r["finish_s"] for r in run["records"]) - min(r["arrival_s"] for r in run["records"])
    chunks = run["long_chunks"]
    return {
        "long_ttft_s": long["ttft_s"],
        "short_ttft_p50_s": percentile([r["ttft_s"] for r in shorts], 50),
        "short_ttft_p99_s": percentile([r["ttft_s"] for r in shorts], 99),
        "short_tbt_p50_s": percentile(tbt_all, 50),
        "short_tbt_p99_s": percentile(tbt_all, 99),
        "short_tbt_during_long_prefill_p50_s": percentile(tbt_during, 50),
        "short_tbt_during_long_prefill_p99_s": percentile(tbt_during, 99),
        "short_tbt_during_long_prefill_max_s": max(tbt_during) if tbt_during else None,
        "short_tbt_during_long_prefill_count": len(tbt_during),
        "output_tokens_per_s": sum(r["output_tokens"] for r in run["records"]) / duration,
        "duration_s": duration,
        "preemptions": sum(r["preemptions"] for r in run["records"]),
        "long_chunks": {
            "count": len(chunks),
            "first": chunks[:3],
            "last": chunks[-3:],
            "by_prefix": [[start, size] for start, size in chunks[:: max(1, len(chunks) // 24)]],
        },
    }


def summarize_simulated(records: list[dict], requests: list[dict]) -> dict:
    """`summarize` of a simulation of `requests` (`as_arrivals`): its records, in their order, of their kinds."""
    kinds = [{**r, "kind": q["kind"]} for r, q in zip(records, requests)]
    return summarize({"records": kinds, "long_chunks": []})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=150, help="trace requests replayed")
    parser.add_argument("--stretch", type=float, default=1.0, help="arrival times × this (a rate this CPU sustains)")
    parser.add_argument("--long", type=int, default=32768, help="tokens of the injected long prompt")
    parser.add_argument("--long-at", type=float, default=15.0, help="its arrival, seconds into the replay")
    parser.add_argument(
        "--slo-factors",
        nargs="*",
        type=float,
        default=[2, 4, 8, 16],
        help="TBT SLOs to run adaptive chunking at, as multiples of the decode-only step time",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    workdir = args.workdir / "trace"
    base = engine_overrides(args.workdir, args.long + 1024, workdir / "profile.json")
    perf_model = profile(base, workdir / "profile.json", again=True)
    shorts = read_trace(args.requests, args.stretch)

    decode_step_s = decode_only_step(base, shorts, workdir)

    long = long_request(args.long, args.long_at)
    runs = [(name, None) for name in FIXED] + [(name, f) for f in args.slo_factors for name in ADAPTIVE]
    results = {}
    for name, factor in runs:
        policy = {**FIXED, **ADAPTIVE}[name]
        slo_ms = 1e3 * decode_step_s * (factor or max(args.slo_factors))
        overrides = base + [f"scheduler.{k}={v}" for k, v in policy.items()] + [f"scheduler.tbt_slo_ms={slo_ms}"]
        label = name if factor is None else f"{name}-slo{factor:g}x"
        started = time.perf_counter()
        results[label] = {
            "policy": policy,
            "slo_factor": factor,
            **summarize(replay(overrides, shorts + [long], workdir, label)),
        }
        r = results[label]
        print(
            f"{label:24s} long TTFT {r['long_ttft_s']:6.2f} s | short TTFT p50/p99 {r['short_ttft_p50_s']:.2f}/"
            f"{r['short_ttft_p99_s']:.2f} s | short TBT while the long prefill ran p50/p99 "
            f"{1e3 * (r['short_tbt_during_long_prefill_p50_s'] or 0):.1f}/"
            f"{1e3 * (r['short_tbt_during_long_prefill_p99_s'] or 0):.1f} ms | "
            f"{r['output_tokens_per_s']:.1f} tok/s | {time.perf_counter() - started:.0f} s",
            flush=True,
        )

    best_fixed = min(FIXED, key=lambda k: results[k]["long_ttft_s"])
    by_slo = {}
    for factor in args.slo_factors:
        slo_s = factor * decode_step_s
        row = {
            "tbt_slo_s": slo_s,
            "best_fixed": best_fixed,
            "fixed_tbt_p99_within_slo": {k: results[k]["short_tbt_during_long_prefill_p99_s"] <= slo_s for k in FIXED},
        }
        for name in ADAPTIVE:
            r = results[f"{name}-slo{factor:g}x"]
            row[name] = {
                "tbt_p99_during_long_prefill_over_slo": r["short_tbt_during_long_prefill_p99_s"] / slo_s,
                "long_ttft_over_best_fixed": r["long_ttft_s"] / results[best_fixed]["long_ttft_s"],
            }
        by_slo[f"{factor:g}x"] = row
        print(
            f"SLO {factor:g} × decode-only step = {1e3 * slo_s:.1f} ms: "
            + "; ".join(
                f"{name}: TBT p99 / SLO {row[name]['tbt_p99_during_long_prefill_over_slo']:.2f}, long TTFT / "
                f"{best_fixed} {row[name]['long_ttft_over_best_fixed']:.2f}"
                for name in ADAPTIVE
            ),
            flush=True,
        )
    write_results(
        f"trace_conv_{args.long}tok.json",
        {
            "model": MODEL,
            "dtype": "float32",
            "threads": 2,
            "trace": TRACE.name,
            "requests": args.requests,
            "stretch": args.stretch,
            "long_tokens": args.long,
            "long_arrival_s": args.long_at,
            "decode_only_step_s": decode_step_s,
            "slo_rule": "tbt_slo = factor × decode-only step (16 decodes)",
            "perf_model_held_out": {
                k: perf_model.report[k]
                for k in ("held_out_steps", "median_abs_error", "p90_abs_error", "max_abs_error")
            },
            "by_slo": by_slo,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
