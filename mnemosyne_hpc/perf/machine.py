"""A hardware profile of this machine, in the format `perf/layout.py` composes for any layout, from the
engine's own measurements: the per-operation curves of single-rank profiles (`python -m
mnemosyne_hpc.profile`, one per reference model) and the collectives between ranks
(`python -m mnemosyne_hpc.perf.collectives`). One rank plays the part of a GPU:

    python -m mnemosyne_hpc.perf.machine OUT.json COLLECTIVES.json PROFILE.json MODEL_DIR [PROFILE.json MODEL_DIR ...]

Per reference model (under its model directory's name): one layer's linear part against tokens, its
attention against query tokens × cached tokens, the LM head with sampling against rows, and the step's
overhead, per-sequence cost, kernel weights and wake after idle fitted to whole steps; all at TP 1, the
layout the profile was taken at. Between ranks: the SPP hand-over (send/receive) and the KVP merge, against bytes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.perf.model import PerfModel

GIB = 2**30


def shape_of(args: ModelArgs) -> dict:
    """A model's shape in the names Vidur's tables use, and what attention and the LM head need besides."""
    return {
        "n_head": args.num_heads,
        "n_kv_head": args.num_kv_heads,
        "n_embd": args.hidden_size,
        "n_expanded_embd": args.intermediate_size,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
    }


def _ms(seconds: list[float]) -> list[float]:
    return [1000 * s for s in seconds]


def reference(model: PerfModel, args: ModelArgs) -> dict:
    """One single-rank profile's curves, by kind, at TP 1."""
    layout = model.report.get("layout", {})
    if any(layout.get(k) != 1 for k in ("tp", "spp", "kvp")):
        raise ValueError(f"a reference profile is taken on one rank (TP 1, SPP 1, KVP 1); this one is {layout}")
    dtype = model.report.get("dtype")
    if dtype != "bfloat16":
        raise ValueError(f"a reference profile is taken in bfloat16 (the layout model counts its bytes), not {dtype}")
    attention = model.attention
    return {
        "shape": shape_of(args),
        "linear": {"tokens": model.linear.x, "ms": _ms(model.linear.y)},
        "attention": {
            "queries": attention.queries,
            "contexts": [curve.x for curve in attention.contexts],
            "ms": [_ms(curve.y) for curve in attention.contexts],
        },
        "lm_head": {"rows": model.lm_head.x, "ms": _ms(model.lm_head.y)},
        "step": {
            "overhead_ms": 1000 * model.overhead_s,
            "per_sequence_ms": 1000 * model.per_sequence_s,
            "weights": model.weights,
            "wake": model.wake,
            "wake_after_ms": 1000 * model.wake_after_s,
        },
        "source": f"python -m mnemosyne_hpc.profile, profile {model.key} taken {model.report.get('date')}, "
        f"held-out median |error| {model.report.get('median_abs_error', float('nan')):.1%}",
    }


def machine_profile(references: dict[str, dict], collectives: dict, hardware: str) -> dict:
    """The hardware profile: `references` (name → `reference(...)`) and `collectives` (as
    `perf/collectives.py` writes them) measured on this machine, whose ranks are `hardware`."""
    ranks = sorted(collectives["send_recv"], key=int)[-1]
    memory_gib = _host_memory_gib()
    measured = {
        "linear_layer": {
            name: {"shape": ref["shape"], "tp": {"1": ref["linear"]}, "source": ref["source"]}
            for name, ref in references.items()
        },
        "attention": {name: {"tp": {"1": ref["attention"]}} for name, ref in references.items()},
        "lm_head": {name: {"tp": {"1": ref["lm_head"]}} for name, ref in references.items()},
        "step": {name: {"tp": {"1": ref["step"]}} for name, ref in references.items()},
        "send_recv": {"intra_node": collectives["send_recv"][ranks]},
        "kvp_merge": collectives["kvp_merge"],
    }
    return {
        "name": f"this machine: {hardware} per rank, {ranks} ranks",
        "gpus_per_node": int(ranks),
        "gpu_memory_gib": memory_gib / int(ranks),
        "memory_utilization": 0.9,
        "activation_reserve_gib": 1,
        "sources": {
            "measured": f"linear, attention, LM head and step fits: single-rank profiles (each entry's source); "
            f"collectives: {collectives['source']}",
            "gpu_memory_gib": "this host's physical memory shared by its ranks",
            "memory_utilization": "assumed, as for GPUs: the share of memory for weights, KV cache and activations",
            "activation_reserve_gib": "assumed: activations and workspace of one step",
        },
        "measured": measured,
    }


def _host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def from_profiles(pairs: list[tuple[Path, Path]], collectives: dict) -> dict:
    """`machine_profile` of single-rank profiles, each (profile file, its model's directory), named by the
    model directory."""
    references, hardware = {}, None
    for profile, model_dir in pairs:
        model = PerfModel.load(Path(profile))
        references[Path(model_dir).name] = reference(model, ModelArgs.from_dir(Path(model_dir)))
        hardware = model.report["hardware"]
    return machine_profile(references, collectives, hardware)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or len(argv) % 2:
        sys.exit(__doc__)
    out, collectives, pairs = Path(argv[0]), json.loads(Path(argv[1]).read_text()), argv[2:]
    profile = from_profiles(list(zip(pairs[::2], pairs[1::2])), collectives)
    out.write_text(json.dumps(profile, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
