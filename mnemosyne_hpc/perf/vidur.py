"""Builds a hardware profile's measured curves from Vidur's public GPU timings (microsoft/vidur, MIT):
per-layer linear and element-wise operations against tokens and TP degree, intra-node all-reduce, and
point-to-point send/receive within and across nodes. Run once; the profile JSON is kept in the repository:

    python -m mnemosyne_hpc.perf.vidur VIDUR_DIR/profiling h100 h100_dgx mnemosyne_hpc/perf/profiles/h100-dgx.json
    python -m mnemosyne_hpc.perf.vidur VIDUR_DIR/profiling a100 a100_dgx mnemosyne_hpc/perf/profiles/a100-dgx.json

Only the measured curves are written (under "measured"); the rest of the profile (attention efficiency,
memory, links) is written by hand with its sources and kept when the file exists.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# Every operation of a layer except attention itself: projections, MLP, norms, RoPE, residual add.
LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
REFERENCE_MODELS = ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf")


def _median_by(rows: list[dict], key, value) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[key(row)].append(value(row))
    return {k: statistics.median(v) for k, v in sorted(groups.items())}


def layer_curves(mlp_csv: Path) -> dict:
    """Milliseconds of one layer's non-attention operations against tokens, per TP degree, and the shape."""
    rows = list(csv.DictReader(open(mlp_csv)))
    shape = {k: int(rows[0][k]) for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd")}
    by_tp = {}
    for tp in sorted({int(r["num_tensor_parallel_workers"]) for r in rows}):
        times = _median_by(
            [r for r in rows if int(r["num_tensor_parallel_workers"]) == tp],
            key=lambda r: int(r["num_tokens"]),
            value=lambda r: sum(float(r[f"time_stats.{op}.median"]) for op in LAYER_OPS),
        )
        by_tp[str(tp)] = {"tokens": list(times), "ms": list(times.values())}
    return {"shape": shape, "tp": by_tp}


def collective_curves(path: Path, name: str, key, keep=lambda row: True) -> dict:
    rows = [r for r in csv.DictReader(open(path)) if keep(r)]
    out = {}
    for label in sorted({key(r) for r in rows}):
        times = _median_by(
            [r for r in rows if key(r) == label],
            key=lambda r: int(r["size"]),
            value=lambda r: float(r[f"time_stats.{name}.median"]),
        )
        out[label] = {"bytes": list(times), "ms": list(times.values())}
    return out


def measured(profiling: Path, gpu: str, network: str) -> dict:
    net = profiling / "network" / network
    return {
        "linear_layer": {m: layer_curves(profiling / "compute" / gpu / m / "mlp.csv") for m in REFERENCE_MODELS},
        # within one node (the A100 table also has runs spread over nodes)
        "all_reduce": collective_curves(
            net / "all_reduce.csv",
            "all_reduce",
            lambda r: r["num_workers"],
            keep=lambda r: r["devices_per_node"] == r["num_workers"],
        ),
        # devices_per_node 1: the two ranks are on two nodes; 2: on one node (NVLink)
        "send_recv": collective_curves(
            net / "send_recv.csv", "send_recv", lambda r: "inter_node" if r["devices_per_node"] == "1" else "intra_node"
        ),
    }


def main() -> None:
    profiling, gpu, network, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    profile = json.loads(out.read_text()) if out.exists() else {}
    profile["measured"] = measured(profiling, gpu, network)
    out.write_text(json.dumps(profile, indent=1) + "\n")


if __name__ == "__main__":
    main()
