"""Calibrate the performance model on this hardware and this parallel layout, and print its error.

    python -m mnemosyne_hpc.profile [overrides]                  # one rank
    launch/mpirun.sh -n 2 python -m mnemosyne_hpc.profile parallel.tp=2

Takes a full profile (`perf/calibrate.py`) and stores it under `<model.cache_dir>/profiles/<key>.json`
(or `scheduler.profile`), keyed by model shape, dtype, hardware and layout; the engine loads it, or
takes a quick one at start-up when none is stored.
"""

from __future__ import annotations

from mnemosyne_hpc.config import compose_command_line
from mnemosyne_hpc.perf.calibrate import calibrate
from mnemosyne_hpc.perf.model import PerfModel
from mnemosyne_hpc.runtime import run


def report(model: PerfModel) -> None:
    r = model.report
    print(
        f"profile {model.key}: {r['hardware']}, {r['dtype']}, layout {r['layout']}; held-out median "
        f"|error| {r['median_abs_error']:.1%} (p90 {r['p90_abs_error']:.1%}) over {r['held_out_steps']} shapes; "
        f"a step after {model.wake_after_s:g} s idle takes {model.wake:.2f}× as long"
    )


def main(argv: list[str] | None = None) -> None:
    run(compose_command_line(argv), lambda engine: report(engine.perf_model), perf_model=calibrate)


if __name__ == "__main__":
    main()
