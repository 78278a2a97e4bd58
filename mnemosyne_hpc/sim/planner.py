"""Which TP × SPP × KVP layout for one long request on a GPU cluster.

Every layout (powers of two; TP within a node, dividing the KV heads and measured in the profile; SPP up to
the layer count) using at most the GPUs given is checked for memory (the weights of its largest stage and
the KV of one KVP group's token range on one GPU) and, where it fits, simulated: the request arrives alone,
is prefilled and decodes `plan.decode_tokens` tokens, with the engine's own scheduler deciding every step
and the layout's performance model (`perf/layout.py`) timing it. Ranked: layouts meeting the TBT SLO (p99)
by TTFT, then those missing it by TBT, then those that do not fit.
"""

from __future__ import annotations

import copy
import math
from typing import Iterator

from mnemosyne_hpc.config import Config
from mnemosyne_hpc.distributed.kvp_layout import KVPLayout
from mnemosyne_hpc.model.args import ModelArgs
from mnemosyne_hpc.perf.layout import GIB, Layout, LayoutCost
from mnemosyne_hpc.sim.simulator import Arrival, Simulator


def layouts(args: ModelArgs, hw: dict, gpus: int) -> Iterator[Layout]:
    powers = [2**i for i in range(gpus.bit_length()) if 2**i <= gpus]
    measured_tp = {int(tp) for reference in hw["measured"]["linear_layer"].values() for tp in reference["tp"]}
    for tp in (t for t in powers if t <= hw["gpus_per_node"] and t in measured_tp and args.num_kv_heads % t == 0):
        for spp in (s for s in powers if s <= args.num_layers and tp * s <= gpus):
            for kvp in (k for k in powers if tp * spp * k <= gpus):
                yield Layout(tp, spp, kvp)


def layout_config(cfg: Config, layout: Layout) -> Config:
    """`cfg` with this layout, and room for the request: KVP groups split the context evenly."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tp, cfg.parallel.spp, cfg.parallel.kvp = layout.tp, layout.spp, layout.kvp
    cfg.parallel.max_tokens_per_kvp_group = 0
    cfg.cache.max_model_len = cfg.plan.context_tokens + cfg.plan.decode_tokens
    return cfg


def evaluate(cfg: Config, args: ModelArgs, hw: dict, layout: Layout, memory_bound: bool = True) -> dict:
    """One row of the plan: memory per GPU, whether it fits and why not, and the simulated latencies. With
    `memory_bound` false a layout that does not fit is simulated all the same, as if its GPUs held the
    request's KV (for scaling curves); its row still says it does not fit."""
    cost, cfg = LayoutCost(hw, args, layout), layout_config(cfg, layout)
    group_tokens = KVPLayout.of(cfg).group_tokens
    kv_bytes = group_tokens * cost.kv_bytes_per_token
    row = {
        "layout": str(layout),
        "tp": layout.tp,
        "spp": layout.spp,
        "kvp": layout.kvp,
        "gpus": layout.gpus,
        "weights_gib": cost.weight_bytes / GIB,
        "kv_gib_per_gpu": kv_bytes / GIB,
        "fits": cost.kv_capacity_bytes >= kv_bytes,
    }
    if not row["fits"]:
        free = max(cost.kv_capacity_bytes, 0) / GIB
        row["why_not"] = (
            f"KV {kv_bytes / GIB:.1f} GiB > {free:.1f} GiB free"
            if free
            else f"weights {cost.weight_bytes / GIB:.1f} GiB leave no room"
        )
        if memory_bound:
            return row
    num_blocks = max(cost.kv_blocks(cfg.cache.block_size), math.ceil(group_tokens / cfg.cache.block_size))
    simulator = Simulator(cfg, args, cost.perf_model(), num_blocks=num_blocks)
    summary = simulator.run([Arrival(0.0, cfg.plan.context_tokens, cfg.plan.decode_tokens)]).summary
    row.update(
        ttft_s=summary["ttft_s"]["p50"],
        tbt_p50_s=summary["tbt_s"]["p50"],
        tbt_p99_s=summary["tbt_s"]["p99"],
        meets_slo=summary["tbt_s"]["p99"] <= summary["tbt_slo_s"],
    )
    return row


def rank(rows: list[dict]) -> list[dict]:
    def key(row):
        if not row["fits"]:
            return (2, row["kv_gib_per_gpu"], row["gpus"])
        if not row["meets_slo"]:
            return (1, row["tbt_p99_s"], row["gpus"])
        return (0, row["ttft_s"], row["gpus"])

    return sorted(rows, key=key)
