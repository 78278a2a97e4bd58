"""The simulator against real runs on this machine, side by side in one run: each scenario is profiled
(`python -m mnemosyne_hpc.profile`, launched as the run is: same ranks, threads and core binding), run
for real, and simulated (`mnemosyne_hpc/sim/`: the engine's own scheduler on a virtual clock, each tick
timed by the profile's performance model through `PipelineTicks`) with the same requests.

    .venv/bin/python bench/sim_fidelity.py              # about 80 minutes on 2 cores

Scenarios (smaller than the benchmarks they come from, so that all of them fit one run):
- bench/spp.py: TTFT of one long prompt at SPP=1 (one core), SPP=2 and plain PP=2 (two ranks, a core each);
- bench/kvp.py: decode TBT (median) and TTFT of one long-context request at KVP=1 and KVP=2;
- bench/trace_replay.py: the Azure conversation trace's first requests with a long prompt injected, under fixed
  chunks (FCFS) and adaptive chunks (FCFS, LARS): short requests' TTFT and TBT p50/p99, long TTFT.

This shared machine's speed drifts by tens of percent within minutes, so every run lies between two profiles
of its layout, one taken just before it (which the engine runs with) and one just after, and is simulated
with each (the scheduler deciding with the first, as the engine did): the simulated figure is the mean of
the two, and how far the machine's speed moved across the run (the same batch shapes timed in both
profiles) is stored beside it. Everything is taken `--repeats` times in turn (every scenario's profiles and
runs; then all again), and the spread between repeats is each figure's noise floor.

Writes bench/results/sim_fidelity.json: every figure measured and simulated in each repeat, its error
(mean simulated / mean measured − 1) and its error with either profile alone, the median and largest
|error|, and every profile's fitted terms.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
from pathlib import Path

import kvp as kvp_bench
import spp as spp_bench
import trace_replay as trace_bench
from common import long_prompt_overrides, mpirun, random_llama, random_prompt, run_checked, run_generate, write_results
from mnemosyne_hpc.perf.model import PerfModel

SPP_MODEL, KVP_MODEL = "llama-8x1024", "llama-kvp-2x256-hd128"  # model directories under --workdir
# each benchmark's single-rank profile, the reference of its layout model and of this machine's hardware profile
SPP_REFERENCE, KVP_REFERENCE = f"{spp_bench.RUNS[0][0]}.profile.json", "kvp1.profile.json"


def profile(ranks: int, overrides: list[str], path: Path, threads: int, bind: bool) -> None:
    """The layout's performance model, taken as `run_generate` launches the run it models."""
    if path.exists():
        return
    command = [*mpirun(ranks, bind), "-m", "mnemosyne_hpc.profile", *overrides, f"scheduler.profile={path}"]
    run_checked(command, threads)


def measure_collectives(path: Path) -> dict:
    """This machine's SPP hand-over and KVP merge against bytes, two ranks a core each (as the runs)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        run_checked([*mpirun(2, bind=True), "-m", "mnemosyne_hpc.perf.collectives", str(path)], threads=1)
    return json.loads(path.read_text())


def layout_model(overrides: list[str], reference_profile: Path, collectives: dict):
    """The layout model (`perf/layout.py`) of this run's layout, on a hardware profile of this machine built
    from one single-rank profile of the model (`perf/machine.py`) and the collectives."""
    from mnemosyne_hpc.config import compose
    from mnemosyne_hpc.model.args import ModelArgs
    from mnemosyne_hpc.perf.layout import Layout, LayoutCost
    from mnemosyne_hpc.perf.machine import from_profiles

    cfg = compose(overrides)
    hw = from_profiles([(reference_profile, Path(cfg.model.path))], collectives)
    layout = Layout(cfg.parallel.tp, cfg.parallel.spp, cfg.parallel.kvp)
    return LayoutCost(hw, ModelArgs.from_dir(Path(cfg.model.path)), layout).perf_model()


def write_machine_profile(taken: Path, workdir: Path, collectives: dict) -> None:
    """This machine's hardware profile from both single-rank profiles (the SPP and the KVP benchmark's
    models) and the collectives: bench/results/machine_profile_cpu.json, for `plan.hardware=`."""
    from mnemosyne_hpc.perf.machine import from_profiles

    pairs = [(taken / SPP_REFERENCE, workdir / SPP_MODEL), (taken / KVP_REFERENCE, workdir / KVP_MODEL)]
    write_results("machine_profile_cpu.json", from_profiles(pairs, collectives))


def simulator(cfg, perf_model, step_time=None):
    """A `Simulator` of the engine `cfg` configures, its scheduler deciding with `perf_model` and every step
    taking `step_time(plan, idle_s)` (by default that model's `PipelineTicks`)."""
    from mnemosyne_hpc.model.args import ModelArgs
    from mnemosyne_hpc.sim.simulator import Simulator

    return Simulator(cfg, ModelArgs.from_dir(Path(cfg.model.path)), perf_model, step_time=step_time)


def simulate(overrides: list[str], perf_model, arrivals: list, timing=None) -> list[dict]:
    """The requests through the simulator with the engine's config and a performance model, which the
    scheduler decides with and, unless another model is given as `timing`, times every step with."""
    from mnemosyne_hpc.config import compose
    from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
    from mnemosyne_hpc.sim.step_time import PipelineTicks

    cfg = compose(overrides)
    ticks = PipelineTicks(timing, KVPLayout.of(cfg)) if timing else None
    return simulator(cfg, perf_model, ticks).run(arrivals).records


def bracketed(overrides: list[str], before: PerfModel, after: PerfModel, arrivals: list) -> tuple[list, list]:
    """The requests simulated as the engine ran them, deciding with the profile taken before the run, every
    step timed once by that profile and once by the same layout's profile taken after the run: the
    machine's speed at both ends of it."""
    return simulate(overrides, before, arrivals), simulate(overrides, before, arrivals, after)


def speed_change(before: PerfModel, after: PerfModel) -> float:
    """How much longer the whole steps of the profile taken after a run took than the same batch shapes in
    the profile taken before it (median ratio): how far the machine's speed moved across the run."""

    def steps(model: PerfModel) -> dict[str, float]:
        report = model.report
        return {json.dumps(r["sequences"]): r["measured_s"] for r in report["calibration"] + report["held_out"]}

    first, second = steps(before), steps(after)
    return statistics.median(second[shape] / seconds for shape, seconds in first.items() if shape in second)


def fitted_terms(fidelity: Path) -> dict:
    """Every profile the runs were simulated with: its fitted terms and held-out error, by repeat and run."""
    profiles = {}
    for path in sorted(fidelity.glob("repeat*/*.profile.json")):
        model = PerfModel.load(path)
        profiles[f"{path.parent.name}/{path.name.removesuffix('.profile.json')}"] = {
            "overhead_ms": 1e3 * model.overhead_s,
            "per_sequence_ms": 1e3 * model.per_sequence_s,
            "weights": model.weights,
            "wake": model.wake,
            "held_out_median_abs_error": model.report["median_abs_error"],
        }
    return profiles


def run_between_profiles(
    ranks: int, overrides: list[str], taken: Path, name: str, request: dict, arrivals: list, threads: int, bind: bool
) -> tuple[dict, dict, dict, float]:
    """The layout profiled, `request` run for real (`run_generate`), the layout profiled again: the run's
    record, its simulations with either profile (`bracketed`) and how far the machine's speed moved."""
    paths = taken / f"{name}.profile.json", taken / f"{name}.after.profile.json"
    profile(ranks, overrides, paths[0], threads, bind)
    measured = run_generate(ranks, overrides, [request], taken / name, threads, bind)[0]
    profile(ranks, overrides, paths[1], threads, bind)
    before, after = map(PerfModel.load, paths)
    on_before, on_after = (records[0] for records in bracketed(overrides, before, after, arrivals))
    return measured, on_before, on_after, speed_change(before, after)


def side_by_side(measured: float, before: float, after: float, speed: float, **more) -> dict:
    """One figure of one run: measured, and simulated with the profiles taken before and after it (`bracketed`)
    and as their mean; `speed` the run's `speed_change`; `more` other simulations of it."""
    return {
        "measured": measured,
        "simulated": (before + after) / 2,
        "simulated_profile_before": before,
        "simulated_profile_after": after,
        "speed_change": speed,
        **more,
    }


def compare(repeats: list[dict]) -> dict:
    """One figure over the repeats, each from `side_by_side`, where taken with "layout_model" (the layout
    model's simulation, from the single-rank profile taken before the run) and "steps_10pct_slower" (the
    simulation with every step of the profile before 10% longer): the means, the error of the simulated
    mean and of the simulation with the profile before alone, each repeat's figures and error, and how far
    apart the repeats lie."""
    mean = statistics.fmean
    measured, simulated = [r["measured"] for r in repeats], [r["simulated"] for r in repeats]
    figure = {"measured": mean(measured), "simulated": mean(simulated)}
    figure["error"] = figure["simulated"] / figure["measured"] - 1
    for end in ("before", "after"):
        figure[f"simulated_profile_{end}"] = mean(r[f"simulated_profile_{end}"] for r in repeats)
        figure[f"error_profile_{end}"] = figure[f"simulated_profile_{end}"] / figure["measured"] - 1
    figure |= {"measured_runs": measured, "simulated_runs": simulated}
    figure["run_errors"] = [s / m - 1 for m, s in zip(measured, simulated)]
    figure["speed_changes"] = [r["speed_change"] for r in repeats]
    figure["measured_spread"] = max(measured) / min(measured) - 1
    figure["simulated_spread"] = max(simulated) / min(simulated) - 1
    before = figure["simulated_profile_before"]
    if "layout_model" in repeats[0]:
        figure["layout_model"] = mean(r["layout_model"] for r in repeats)
        figure["layout_model_vs_profile"] = figure["layout_model"] / before - 1
    if "steps_10pct_slower" in repeats[0]:
        figure["steps_10pct_slower_moves_it"] = mean(r["steps_10pct_slower"] for r in repeats) / before - 1
    return figure


def spp_scenarios(args, taken: Path, collectives: dict) -> dict:
    """One repeat of the SPP benchmark's layouts: {figure: {"measured", "simulated", "layout_model"}}."""
    from mnemosyne_hpc.sim.simulator import Arrival

    model_dir = random_llama(args.workdir / SPP_MODEL, **spp_bench.MODEL)
    request = {"prompt_token_ids": random_prompt(args.spp_tokens, 0, spp_bench.MODEL["vocab_size"])}
    request.update(max_tokens=1, ignore_eos=True)
    common = long_prompt_overrides(model_dir, args.spp_tokens + 16, args.spp_chunk, 1800)
    figures, arrivals = {}, [Arrival(0.0, args.spp_tokens, 1)]
    single_rank = taken / SPP_REFERENCE
    for name, ranks, threads, bind, layout in spp_bench.RUNS[:3]:
        overrides = common + layout
        measured, on_before, on_after, speed = run_between_profiles(
            ranks, overrides, taken, name, request, arrivals, threads, bind
        )
        composed = simulate(overrides, layout_model(overrides, single_rank, collectives), arrivals)[0]
        figures[f"spp/{name}/ttft_s"] = side_by_side(
            measured["ttft_s"], on_before["ttft_s"], on_after["ttft_s"], speed, layout_model=composed["ttft_s"]
        )
    return figures


def kvp_scenarios(args, taken: Path, collectives: dict) -> dict:
    """One repeat of the KVP benchmark's layouts: {figure: {"measured", "simulated", "layout_model"}}."""
    from mnemosyne_hpc.sim.simulator import Arrival

    model_dir = random_llama(args.workdir / KVP_MODEL, **kvp_bench.MODEL)
    prompt = random_prompt(args.kvp_tokens, 0, kvp_bench.MODEL["vocab_size"])
    request = {"prompt_token_ids": prompt, "max_tokens": args.kvp_decode + 1, "ignore_eos": True}
    max_model_len = args.kvp_tokens + args.kvp_decode + 1
    kv_gib = 2 * max_model_len * kvp_bench.kv_bytes_per_block() / kvp_bench.BLOCK_SIZE / 2**30
    common = long_prompt_overrides(
        model_dir, max_model_len, 2048, 3600, block_size=kvp_bench.BLOCK_SIZE, kv_memory_gib=f"{kv_gib:.3f}"
    )
    figures, arrivals = {}, [Arrival(0.0, args.kvp_tokens, args.kvp_decode + 1)]
    single_rank = taken / KVP_REFERENCE
    for kvp in (1, 2):
        overrides = common + [f"parallel.kvp={kvp}"]
        measured, on_before, on_after, speed = run_between_profiles(
            kvp, overrides, taken, f"kvp{kvp}", request, arrivals, 1, True
        )
        composed = simulate(overrides, layout_model(overrides, single_rank, collectives), arrivals)[0]
        for key, pick in (("ttft_s", lambda r: r["ttft_s"]), ("tbt_median_s", lambda r: statistics.median(r["tbt_s"]))):
            figures[f"kvp/kvp{kvp}/{key}"] = side_by_side(
                pick(measured), pick(on_before), pick(on_after), speed, layout_model=pick(composed)
            )
    return figures


TRACE_POLICIES = {
    "fixed1024-fcfs": {"chunking": "fixed", "chunk_size": 1024, "priority": "fcfs"},
    **trace_bench.ADAPTIVE,
}
TRACE_FIGURES = ("short_ttft_p50_s", "short_ttft_p99_s", "short_tbt_p50_s", "short_tbt_p99_s", "long_ttft_s")


def slower(model, factor: float):
    """A copy of the performance model with every step `factor` times as long (collectives aside)."""
    return dataclasses.replace(
        model,
        weights={name: factor * weight for name, weight in model.weights.items()},
        overhead_s=factor * model.overhead_s,
        per_sequence_s=factor * model.per_sequence_s,
    )


def trace_slo_ms(args) -> float:
    """The replays' TBT SLO, the same in every repeat: 4 × the decode-only step (fixed chunks, FCFS: no
    profile read), measured once."""
    base = trace_bench.engine_overrides(args.workdir, args.trace_long + 1024)
    shorts = trace_bench.read_trace(args.trace_requests, 1.0)
    return 4e3 * trace_bench.decode_only_step(base, shorts, args.workdir / "fidelity" / "trace")


def trace_scenarios(args, taken: Path, collectives: dict) -> dict:
    """One repeat of bench/trace_replay.py's replay (one rank, 2 threads, float32) per arrival rate
    (`--trace-stretches`: arrival times × each) and policy, each replay between two profiles of the engine
    (the same for every policy: the one after a replay is the one before the next), simulated with both
    (`bracketed`), and with every step of the profile before 10% longer (how far an error of the step time,
    or a slower spell of the machine, moves a figure): {figure: `side_by_side`}. No layout model here: a
    hardware profile is taken in bfloat16."""
    figures, runs = {}, [(stretch, name) for stretch in args.trace_stretches for name in TRACE_POLICIES]
    profiles = [taken / f"trace-{i}.profile.json" for i in range(len(runs) + 1)]  # replay i between i and i + 1
    max_model_len = args.trace_long + 1024
    trace_bench.profile(trace_bench.engine_overrides(args.workdir, max_model_len, profiles[0]), profiles[0])
    for (stretch, name), before, after in zip(runs, profiles, profiles[1:]):
        shorts = trace_bench.read_trace(args.trace_requests, stretch)
        requests = shorts + [trace_bench.long_request(args.trace_long, args.trace_long_at * stretch)]
        arrivals = trace_bench.as_arrivals(requests)
        run = f"trace-x{stretch:g}-{name}"
        overrides = trace_bench.engine_overrides(args.workdir, max_model_len, before)
        overrides += [f"scheduler.{k}={v}" for k, v in TRACE_POLICIES[name].items()]
        overrides += [f"scheduler.tbt_slo_ms={args.trace_slo_ms}"]
        measured = trace_bench.summarize(trace_bench.replay(overrides, requests, taken, run))
        timed_after = trace_bench.profile(trace_bench.engine_overrides(args.workdir, max_model_len, after), after)
        decided = PerfModel.load(before)
        simulated = [
            *bracketed(overrides, decided, timed_after, arrivals),
            simulate(overrides, slower(decided, 1.1), arrivals),
        ]
        on_before, on_after, steps_slower = (trace_bench.summarize_simulated(r, requests) for r in simulated)
        speed = speed_change(decided, timed_after)
        for key in TRACE_FIGURES:
            figures[f"trace/x{stretch:g}/{name}/{key}"] = side_by_side(
                measured[key], on_before[key], on_after[key], speed, steps_10pct_slower=steps_slower[key]
            )
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
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="profiles and runs taken this many times in turn: their spread is each figure's noise floor",
    )
    parser.add_argument(
        "--trace-stretches",
        nargs="*",
        type=float,
        default=[1.0, 2.0],
        help="arrival times × each: 1 runs this CPU close to its capacity, 2 at half that rate",
    )
    parser.add_argument(
        "--reuse-profiles", action="store_true", help="keep profiles of an earlier run (else taken again now)"
    )
    parser.add_argument(
        "--only", nargs="*", default=["spp", "kvp", "trace"], help="some scenarios: written to sim_fidelity_<them>.json"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()
    scenarios = {"spp": spp_scenarios, "kvp": kvp_scenarios, "trace": trace_scenarios}
    fidelity = args.workdir / "fidelity"
    if not args.reuse_profiles:  # the machine's speed drifts: a profile is compared with the runs just after it
        for stale in [*fidelity.glob("**/*profile.json"), fidelity / "collectives.json"]:
            stale.unlink(missing_ok=True)
    collectives, samples = measure_collectives(fidelity / "collectives.json"), collections.defaultdict(list)
    if "trace" in args.only:
        args.trace_slo_ms = trace_slo_ms(args)
    for repeat in range(args.repeats):
        taken = fidelity / f"repeat{repeat}"
        for name in args.only:
            for key, figure in scenarios[name](args, taken, collectives).items():
                samples[key].append(figure)
                error = figure["simulated"] / figure["measured"] - 1
                print(f"repeat {repeat} {key}: measured {figure['measured']:.4g}, error {error:+.1%}", flush=True)
    figures = {key: compare(repeated) for key, repeated in samples.items()}
    errors = [abs(f["error"]) for f in figures.values()]
    summary = {"figures": len(errors), "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
    run_errors = [abs(e) for f in figures.values() for e in f["run_errors"]]  # each repeat alone
    summary["run_errors"] = {"median_abs": statistics.median(run_errors), "max_abs": max(run_errors)}
    for end in ("before", "after"):  # simulated with one of the two profiles alone
        alone = [abs(f[f"error_profile_{end}"]) for f in figures.values()]
        summary[f"profile_{end}_alone"] = {"median_abs_error": statistics.median(alone), "max_abs_error": max(alone)}
    speeds = [abs(s - 1) for f in figures.values() for s in f["speed_changes"]]
    summary["speed_change_across_a_run"] = {"median_abs": statistics.median(speeds), "max_abs": max(speeds)}
    spreads = [f["measured_spread"] for f in figures.values()]
    summary["measured_spread"] = {"median": statistics.median(spreads), "max": max(spreads)}
    if composed := [abs(f["layout_model_vs_profile"]) for f in figures.values() if "layout_model" in f]:
        summary["layout_model_vs_profile"] = {"median_abs": statistics.median(composed), "max_abs": max(composed)}
    print(json.dumps(summary))
    if {"spp", "kvp"} <= set(args.only):
        write_machine_profile(fidelity / f"repeat{args.repeats - 1}", args.workdir, collectives)  # the latest
    scenarios_run = "" if set(args.only) == set(scenarios) else "_" + "_".join(args.only)  # a part: its own file
    write_results(
        f"sim_fidelity{scenarios_run}.json",
        {
            "benchmark": "sim_fidelity",
            "settings": {k: v for k, v in vars(args).items() if k != "workdir"},
            **summary,
            "figures": figures,
            "profiles": fitted_terms(fidelity),
        },
    )


if __name__ == "__main__":
    main()
