"""One benchmark run on two revisions of this repository, alternately, in one run: every figure it
records, the head revision's over the base's. It shows whether a change slowed the engine down.

Each revision is checked out once into its own worktree (under --workdir) and runs its own copy of
the benchmark there. Rounds alternate the order (base first, then head first, ...) so that a machine
that slows down or speeds up during the run weighs on both alike; each figure is the median over
rounds. Writes `results/compare_<results file stem>.json`.

  .venv/bin/python bench/compare_revisions.py --base cde8474 --results roofline.json -- roofline.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, write_results


def checkout(revision: str, workdir: Path) -> tuple[str, Path]:
    """The full commit id of `revision` and a worktree holding it."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    tree = workdir / commit[:12]
    if not tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True
        )
    return commit, tree


def run(tree: Path, command: list[str], results: str) -> dict:
    """The benchmark `command` (a script under bench/ and its arguments) run in `tree`: its record."""
    record = tree / "bench" / "results" / results
    record.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this revision's package, not the installed one
    subprocess.run([sys.executable, str(tree / "bench" / command[0]), *command[1:]], cwd=tree, env=env, check=True)
    return json.loads(record.read_text())


def numbers(record, prefix: str = "") -> dict[str, float]:
    """Every number in a record, by its path of keys ("ratios.mfu_prefill_8192")."""
    if isinstance(record, dict):
        return {path: value for key, item in record.items() for path, value in numbers(item, f"{prefix}{key}.").items()}
    if isinstance(record, (int, float)) and not isinstance(record, bool):
        return {prefix.rstrip("."): float(record)}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision before the change")
    parser.add_argument("--head", default="HEAD", help="the revision with the change (committed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", required=True, help="the file the benchmark writes under bench/results/")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench/revisions"))
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [its arguments]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the benchmark after --, e.g. -- roofline.py")

    args.workdir.mkdir(parents=True, exist_ok=True)
    shared = args.workdir / "shared"  # the benchmarks read ../shared (traces) beside their checkout
    if (ROOT.parent / "shared").exists() and not shared.exists():
        shared.symlink_to(ROOT.parent / "shared")
    revisions = {"base": checkout(args.base, args.workdir), "head": checkout(args.head, args.workdir)}
    figures = {"base": [], "head": []}
    for round_ in range(args.rounds):
        for name in ("base", "head") if round_ % 2 == 0 else ("head", "base"):
            print(f"round {round_ + 1}/{args.rounds}: {name} ({revisions[name][0][:12]})", file=sys.stderr, flush=True)
            figures[name].append(numbers(run(revisions[name][1], command, args.results)))

    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in figures.items()
    }
    shared = [key for key in medians["base"] if key in medians["head"] and medians["base"][key]]
    compared = {
        key: {
            "base": medians["base"][key],
            "head": medians["head"][key],
            "head_over_base": medians["head"][key] / medians["base"][key],
        }
        for key in shared
    }
    write_results(
        f"compare_{Path(args.results).stem}.json",
        {
            "benchmark": "compare_revisions",
            "command": command,
            "rounds": args.rounds,
            "base": revisions["base"][0],
            "head": revisions["head"][0],
            "ratios": {key: value["head_over_base"] for key, value in compared.items() if key.startswith("ratios.")},
            "figures": compared,
        },
    )


if __name__ == "__main__":
    main()
