"""The simulator against real runs on this machine, side by side in one run: each scenario is profiled
(`python -m mnemosyne_hpc.profile`, launched as the run is: same ranks, threads and core binding), run
for real, and simulated (`mnemosyne_hpc/sim/`: the engine's own scheduler on a virtual clock, each tick
timed by the profile's performance model through `PipelineTicks`) with the same requests.

    .venv/bin/python bench/sim_fidelity.py              # about 20 minutes on 2 cores

Scenarios (smaller than the benchmarks they come from, so that all of them fit one run):
- bench/spp.py: TTFT of one long prompt at SPP=1 (one core), SPP=2 and plain PP=2 (two ranks, a core each);
- bench/kvp.py: decode TBT (median) and TTFT of one long-context request at KVP=1 and KVP=2;
- bench/trace_replay.py: the Azure conversation trace's first requests with a long prompt injected, under fixed
  chunks (FCFS) and adaptive chunks (FCFS, LARS): short requests' TTFT and TBT p50/p99, long TTFT.

Writes bench/results/sim_fidelity.json: every figure measured and simulated, its error
(simulated / measured − 1), and the median and largest |error|.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import kvp as kvp_bench
import spp as spp_bench
import trace_replay as trace_bench
from common import ROOT, long_prompt_overrides, random_llama, random_prompt, run_generate, write_results


def profile(ranks: int, overrides: list[str], path: Path, threads: int, bind: bool) -> None:
    """The layout's performance model, taken as `run_generate` launches the run it models."""
    if path.exists():
        return
    mpirun = str(Path(sys.executable).parent / "mpirun")
    command = [mpirun, *(["-bind-to", "core"] if bind else []), "-n", str(ranks), sys.executable]
    command += ["-m", "mnemosyne_hpc.profile", *overrides, f"scheduler.profile={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)


def simulate(overrides: list[str], profile_path: Path, arrivals: list) -> list[dict]:
    """The requests through the simulator with the engine's config and the profiled performance model."""
    import torch

    from mnemosyne_hpc.config import compose
    from mnemosyne_hpc.engine.runner import kv_pool_blocks
    from mnemosyne_hpc.model.args import ModelArgs
    from mnemosyne_hpc.perf.model import PerfModel
    from mnemosyne_hpc.sim.simulator import Simulator

    cfg = compose(overrides)
    args = ModelArgs.from_dir(Path(cfg.model.path))
    blocks = kv_pool_blocks(cfg.cache, args, cfg.parallel.tp, cfg.parallel.spp, getattr(torch, cfg.model.dtype))
    return Simulator(cfg, args, PerfModel.load(profile_path), num_blocks=blocks).run(arrivals).records


def compare(measured: float, simulated: float) -> dict:
    return {"measured": measured, "simulated": simulated, "error": simulated / measured - 1}


def spp_scenarios(args, workdir: Path) -> dict:
    from mnemosyne_hpc.sim.simulator import Arrival

    model_dir = random_llama(workdir / "llama-8x1024", **spp_bench.MODEL)
    request = {"prompt_token_ids": random_prompt(args.spp_tokens, 0, spp_bench.MODEL["vocab_size"])}
    request.update(max_tokens=1, ignore_eos=True)
    common = long_prompt_overrides(model_dir, args.spp_tokens + 16, args.spp_chunk, 1800)
    figures = {}
    for name, ranks, threads, bind, layout in spp_bench.RUNS[:3]:
        overrides = common + layout
        path = workdir / "fidelity" / f"{name}.profile.json"
        profile(ranks, overrides, path, threads, bind)
        measured = run_generate(ranks, overrides, [request], workdir / "fidelity" / name, threads, bind)[0]
        simulated = simulate(overrides, path, [Arrival(0.0, args.spp_tokens, 1)])[0]
        figures[f"spp/{name}/ttft_s"] = compare(measured["ttft_s"], simulated["ttft_s"])
        print(f"spp {name}: TTFT {figures[f'spp/{name}/ttft_s']}", flush=True)
    return figures


def kvp_scenarios(args, workdir: Path) -> dict:
    from mnemosyne_hpc.sim.simulator import Arrival

    model_dir = random_llama(workdir / "llama-kvp-2x256-hd128", **kvp_bench.MODEL)
    prompt = random_prompt(args.kvp_tokens, 0, kvp_bench.MODEL["vocab_size"])
    request = {"prompt_token_ids": prompt, "max_tokens": args.kvp_decode + 1, "ignore_eos": True}
    max_model_len = args.kvp_tokens + args.kvp_decode + 1
    kv_gib = 2 * max_model_len * kvp_bench.kv_bytes_per_block() / kvp_bench.BLOCK_SIZE / 2**30
    common = long_prompt_overrides(
        model_dir, max_model_len, 2048, 3600, block_size=kvp_bench.BLOCK_SIZE, kv_memory_gib=f"{kv_gib:.3f}"
    )
    figures = {}
    for kvp in (1, 2):
        overrides = common + [f"parallel.kvp={kvp}"]
        path = workdir / "fidelity" / f"kvp{kvp}.profile.json"
        profile(kvp, overrides, path, 1, True)
        measured = run_generate(kvp, overrides, [request], workdir / "fidelity" / f"kvp{kvp}", 1, True)[0]
        simulated = simulate(overrides, path, [Arrival(0.0, args.kvp_tokens, args.kvp_decode + 1)])[0]
        for key, pick in (("ttft_s", lambda r: r["ttft_s"]), ("tbt_median_s", lambda r: statistics.median(r["tbt_s"]))):
            figures[f"kvp/kvp{kvp}/{key}"] = compare(pick(measured), pick(simulated))
        print(f"kvp {kvp}: {[figures[f'kvp/kvp{kvp}/{k}'] for k in ('ttft_s', 'tbt_median_s')]}", flush=True)
    return figures


TRACE_POLICIES = {
    "fixed1024-fcfs": {"chunking": "fixed", "chunk_size": 1024, "priority": "fcfs"},
    **trace_bench.ADAPTIVE,
}
TRACE_FIGURES = ("short_ttft_p50_s", "short_ttft_p99_s", "short_tbt_p50_s", "short_tbt_p99_s", "long_ttft_s")


def trace_scenarios(args, workdir: Path) -> dict:
    """bench/trace_replay.py's replay (one rank, 2 threads, float32), its TBT SLO 4 × the decode-only step."""
    from mnemosyne_hpc.sim.simulator import Arrival

    out = workdir / "fidelity" / "trace"
    path = out / "profile.json"
    base = trace_bench.engine_overrides(workdir, args.trace_long + 1024, path)
    trace_bench.profile(base, path)
    shorts = trace_bench.read_trace(args.trace_requests, 1.0)
    decode_step_s = trace_bench.decode_only_step(base, shorts, out)
    requests = shorts + [trace_bench.long_request(args.trace_long, args.trace_long_at)]
    arrivals = [Arrival(r["arrival_s"], len(r["prompt_token_ids"]), r["max_tokens"]) for r in requests]
    figures = {}
    for name, policy in TRACE_POLICIES.items():
        overrides = base + [f"scheduler.{k}={v}" for k, v in policy.items()]
        overrides.append(f"scheduler.tbt_slo_ms={4e3 * decode_step_s}")
        measured = trace_bench.summarize(trace_bench.replay(overrides, requests, out, name))
        records = simulate(overrides, path, arrivals)
        simulated = trace_bench.summarize(
            {"records": [{**r, "kind": q["kind"]} for r, q in zip(records, requests)], "long_chunks": []}
        )
        for key in TRACE_FIGURES:
            figures[f"trace/{name}/{key}"] = compare(measured[key], simulated[key])
        print(f"trace {name}: " + ", ".join(f"{k} {figures[f'trace/{name}/{k}']['error']:+.1%}" for k in TRACE_FIGURES))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spp-tokens", type=int, default=8192)
    parser.add_argument("--spp-chunk", type=int, default=256)
    parser.add_argument("--kvp-tokens", type=int, default=32768)
    parser.add_argument("--kvp-decode", type=int, default=32)
    parser.add_argument("--trace-requests", type=int, default=100)
    parser.add_argument("--trace-long", type=int, default=16384)
    parser.add_argument("--trace-long-at", type=float, default=10.0)
    parser.add_argument("--only", nargs="*", default=["spp", "kvp", "trace"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()
    scenarios = {"spp": spp_scenarios, "kvp": kvp_scenarios, "trace": trace_scenarios}
    figures = {}
    for name in args.only:
        figures.update(scenarios[name](args, args.workdir))
    errors = [abs(f["error"]) for f in figures.values()]
    summary = {"figures": len(errors), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
    print(json.dumps(summary))
    write_results(
        "sim_fidelity.json",
        {
            "benchmark": "sim_fidelity",
            "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
            **summary,
            "figures": figures,
        },
    )


if __name__ == "__main__":
    main()
