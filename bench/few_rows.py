"""A decode step's linear layers on CPU: the few-row kernels (`kernels/gemv.c`, `kernels/skinny.c` where
there is AMX) against torch's bf16 matrix product, for 1 to 8 rows (sequences decoding together) on the
embedded SmolLM2's shapes (q/k/v, o, gate/up, down, and the 49152-row head), side by side in one run.

    .venv/bin/python bench/few_rows.py

Writes bench/results/few_rows.json: median microseconds per call of each, by shape and rows, and the
ratio torch / ours.
"""

from __future__ import annotations

import statistics
import time

import torch

from common import write_results

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
ROWS = (1, 2, 4, 8)


def median_us(function, repeats: int = 30) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    from mnemosyne_hpc.model.backend import select_backend

    torch.manual_seed(0)
    ours = select_backend(torch.bfloat16, torch.device("cpu"))
    results, ratios = {}, {}
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features).bfloat16()
        for rows in ROWS:
            x = torch.randn(rows, in_features).bfloat16()
            kernel = median_us(lambda: ours.linear(x, weight))
            reference = median_us(lambda: torch.mm(weight, x.T).T.contiguous())
            results[f"{name}_{rows}rows"] = {"ours_us": kernel, "torch_mm_us": reference}
            ratios[f"{name}_{rows}rows_torch_over_ours"] = reference / kernel
            print(f"{name:8s} {rows} rows: ours {kernel:8.1f} us, torch {reference:8.1f} us", flush=True)
    write_results("few_rows.json", {"benchmark": "few_rows", "backend": ours.name, "shapes": results, "ratios": ratios})


if __name__ == "__main__":
    main()
