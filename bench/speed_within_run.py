"""How much of the simulator's error on bench/sim_fidelity.py's trace replays comes from the machine's
speed changing within a run, which neither the profile taken before the run nor the one after it sees.

    .venv/bin/python bench/speed_within_run.py      # reads sim_fidelity's work directory; about 15 seconds

For every trace replay that sim_fidelity left in its work directory:
1. The run's own step times, replayed through the simulator (`RecordedSteps`: the engine's decisions
   again, as in tests/test_sim.py), give every step's batch. The profile taken before the run predicts each of those
   steps; the measured over predicted time, median over the steps within `--window` seconds of each, is
   the machine's speed along the run relative to that profile.
2. The run is simulated once as sim_fidelity does with that profile alone, and once with every step's
   prediction scaled by that speed at the step's time on the virtual clock. The scheduler decides with
   the profile in both, as the engine did.

The second simulation borrows the measured run's speed, so it is no prediction: it shows which part of a
figure's error is the machine's speed within the run and which part is the model. Near capacity a slow
spell of a few seconds builds a queue that outlasts it, and the steps run behind that queue (more
requests decoding at once) are the ones timed in the slow spell.

Writes bench/results/sim_fidelity_speed.json: per replay and figure, measured, simulated with the profile
alone and at the run's speed, and their errors; per replay, the speed's spread along the run.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
from pathlib import Path

import numpy as np

import sim_fidelity
import trace_replay as trace_bench
from common import write_results
from mnemosyne_hpc.config import Config, compose
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.perf.model import PerfModel
from mnemosyne_hpc.sim.step_time import PipelineTicks, RecordedSteps


def recorded_durations(steps: list[dict], first_arrival: float) -> list[float]:
    """Each measured step's time from when the run's loop took arrivals in before it (`admitted_s`) until it
    did so before the next, the loop around the engine and any idle spell included, so that the replay's
    clock reads the run's whenever the scheduler admits requests and decides; the first from the first
    arrival, where the simulator's clock starts it."""
    admitted = [s["admitted_s"] for s in steps]
    durations = [b - a for a, b in zip(admitted, admitted[1:])] + [steps[-1]["seconds"]]
    durations[0] += admitted[0] - first_arrival
    return durations


def speed_along_run(cfg: Config, model: PerfModel, arrivals: list, steps: list[dict], window: float):
    """(step start times, the machine's speed there over `model`'s): the run replayed with its own step times."""
    recorded = RecordedSteps(recorded_durations(steps, min(a.time for a in arrivals)))
    ticks, ratios = PipelineTicks(model, KVPLayout.of(cfg)), []

    def replayed(plan, idle_s: float) -> float:
        seconds = recorded(plan, idle_s)  # first: it says so where the replay outruns the run
        ratios.append(steps[len(ratios)]["seconds"] / ticks(plan, idle_s))
        return seconds

    sim_fidelity.simulator(cfg, model, replayed).run(arrivals)
    times = [s["start_s"] for s in steps[: len(ratios)]]
    speeds = []
    for t in times:
        lo, hi = bisect.bisect_left(times, t - window), bisect.bisect_right(times, t + window)
        speeds.append(statistics.median(ratios[lo:hi]))
    return times, speeds


def at_speed(cfg: Config, model: PerfModel, arrivals: list, times: list[float], speeds: list[float]):
    """The requests simulated with every step `model` predicts scaled by the speed at its virtual time."""
    ticks = PipelineTicks(model, KVPLayout.of(cfg))

    def paced(plan, idle_s: float) -> float:
        return ticks(plan, idle_s) * speeds[max(0, bisect.bisect(times, sim.clock.now) - 1)]

    sim = sim_fidelity.simulator(cfg, model, paced)
    return sim.run(arrivals).records


def replays(fidelity: Path):
    """(repeat directory, run name) of every trace replay stored under sim_fidelity's work directory."""
    for spec in sorted(fidelity.glob("repeat*/trace-x*.spec.json")):
        if spec.with_name(spec.name.replace(".spec.", ".out.")).exists():
            yield spec.parent, spec.name.removesuffix(".spec.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"), help="sim_fidelity's")
    parser.add_argument("--window", type=float, default=1.0, help="seconds either side of a step its speed spans")
    args = parser.parse_args()
    results, errors = {}, {"profile": [], "at_speed": []}
    for taken, run in replays(args.workdir / "fidelity"):
        spec = json.loads((taken / f"{run}.spec.json").read_text())
        out = json.loads((taken / f"{run}.out.json").read_text())
        if "admitted_s" not in out["steps"][0]:
            raise SystemExit(f"{taken / run}: recorded without admitted_s; run bench/sim_fidelity.py again")
        cfg, requests = compose(spec["overrides"]), spec["requests"]
        model, arrivals = PerfModel.load(Path(cfg.scheduler.profile)), trace_bench.as_arrivals(requests)
        times, speeds = speed_along_run(cfg, model, arrivals, out["steps"], args.window)
        measured = trace_bench.summarize(out)
        alone = trace_bench.summarize_simulated(sim_fidelity.simulator(cfg, model).run(arrivals).records, requests)
        paced = trace_bench.summarize_simulated(at_speed(cfg, model, arrivals, times, speeds), requests)
        figures = {}
        for key in sim_fidelity.TRACE_FIGURES:
            figures[key] = {
                "measured": measured[key],
                "simulated_profile": alone[key],
                "simulated_at_run_speed": paced[key],
                "error_profile": alone[key] / measured[key] - 1,
                "error_at_run_speed": paced[key] / measured[key] - 1,
            }
            errors["profile"].append(abs(figures[key]["error_profile"]))
            errors["at_speed"].append(abs(figures[key]["error_at_run_speed"]))
        p10, p50, p90 = np.percentile(speeds, [10, 50, 90])
        results[f"{taken.name}/{run}"] = {"speed": {"p10": p10, "median": p50, "p90": p90}, "figures": figures}
        print(
            f"{taken.name}/{run}: speed over the profile p10/p50/p90 {p10:.2f}/{p50:.2f}/{p90:.2f}; "
            + ", ".join(
                f"{key.removesuffix('_s')} {f['error_profile']:+.0%} → {f['error_at_run_speed']:+.0%}"
                for key, f in figures.items()
            ),
            flush=True,
        )
    summary = {
        name: {"figures": len(e), "median_abs_error": statistics.median(e), "max_abs_error": max(e)}
        for name, e in errors.items()
    }
    print(json.dumps(summary))
    write_results(
        "sim_fidelity_speed.json",
        {"benchmark": "speed_within_run", "window_s": args.window, **summary, "replays": results},
    )


if __name__ == "__main__":
    main()
