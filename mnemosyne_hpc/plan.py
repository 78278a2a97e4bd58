"""Plan a deployment: which TP × SPP × KVP layout serves one long request on a GPU cluster, with what TTFT
and TBT, and does it fit in memory. Simulated (`sim/planner.py`); no GPU or checkpoint needed.

    python -m mnemosyne_hpc.plan model=llama3-8b plan.hardware=h100-dgx plan.gpus=128 plan.context=10M

Prints a ranked table and writes a JSON result (`plan.output`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from mnemosyne_hpc.config import compose_command_line
from mnemosyne_hpc.perf.layout import load_hardware, load_shape
from mnemosyne_hpc.sim.planner import evaluate, layouts, rank

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def table(rows: list[dict], slo_ms: float) -> str:
    lines = [
        f"{'layout':<20} {'GPUs':>4} {'TTFT s':>9} {'TBT p50 ms':>10} {'TBT p99 ms':>10} {'weights GiB':>11} "
        f"{'KV GiB/GPU':>10}  fits"
    ]
    for r in rows:
        if r["fits"]:
            latency = f"{r['ttft_s']:>9.1f} {1000 * r['tbt_p50_s']:>10.1f} {1000 * r['tbt_p99_s']:>10.1f}"
            verdict = "yes" if r["meets_slo"] else f"yes, TBT over {slo_ms:g} ms"
        else:
            latency, verdict = f"{'-':>9} {'-':>10} {'-':>10}", f"no: {r['why_not']}"
        lines.append(
            f"{r['layout']:<20} {r['gpus']:>4} {latency} {r['weights_gib']:>11.1f} "
            f"{r['kv_gib_per_gpu']:>10.1f}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = compose_command_line(argv, config_name="plan")
    plan, started = cfg.plan, time.perf_counter()
    args, hw = load_shape(cfg.model.path), load_hardware(plan.hardware)
    model = Path(cfg.model.path).stem
    candidates = list(layouts(args, hw, plan.gpus))
    rows = rank(
        [
            evaluate(cfg, args, hw, layout)
            for layout in tqdm(candidates, desc="layouts", disable=not plan.progress, file=sys.stderr)
        ]
    )
    elapsed = time.perf_counter() - started
    print(
        f"{model} on up to {plan.gpus} GPUs ({hw['name']}), {plan.context_tokens:,} prompt tokens, "
        f"{plan.decode_tokens} decoded, TBT SLO {cfg.scheduler.tbt_slo_ms:g} ms; {cfg.scheduler.chunking} "
        f"chunks ({cfg.scheduler.chunk_size} tokens when fixed), {len(rows)} layouts in {elapsed:.1f} s"
    )
    print(table(rows, cfg.scheduler.tbt_slo_ms))
    output = Path(
        plan.output or RESULTS / f"plan_{model}_{Path(plan.hardware).stem}_{plan.gpus}gpus_{plan.context}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "model": model,
                "hardware": hw["name"],
                "plan": asdict(plan),
                "scheduler": asdict(cfg.scheduler),
                "elapsed_s": elapsed,
                "layouts": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"written {output}")


if __name__ == "__main__":
    main()
