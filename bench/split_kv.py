"""What a decode costs when its KV lies in two runs of consecutive cache slots instead of one, per layer:
the backend's decode attention over 8 sequences, each one run against each split in two, side by side in
one run, in float32 (torch's kernels over a copy of the runs, or a call per run) and bfloat16 (this
project's kernel, which reads every run in place), at the trace model's heads (4 query heads over one KV
head of 64; `bench/trace_replay.py`).

    .venv/bin/python bench/split_kv.py

Why it matters: the block allocator holds the blocks after a sequence open for its growth
(`engine/kv_cache.py`), so that a decode's KV stays one run. Writes bench/results/split_kv.json: median
microseconds per layer of each layout, and the extra per split decode.
"""

from __future__ import annotations

import torch

from common import write_results

DECODES, QUERY_HEADS, HEAD_DIM = 8, 4, 64
CONTEXTS = (256, 1024, 4096)


def runs(context: int, split: bool) -> list[list[tuple[int, int]]]:
    """(first slot, length) runs of each sequence: one after another, or with each one's second half
    placed after all the first halves."""
    if not split:
        return [[(i * context, context)] for i in range(DECODES)]
    half = context // 2
    return [[(i * half, half), (DECODES * half + i * (context - half), context - half)] for i in range(DECODES)]


def main() -> None:
    from mnemosyne_hpc.model.attention import DecodeBatch
    from mnemosyne_hpc.model.backend import select_backend
    from mnemosyne_hpc.perf.timing import median_times

    torch.manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        backend = select_backend(dtype, torch.device("cpu"))
        q = torch.randn(DECODES, QUERY_HEADS, HEAD_DIM, dtype=dtype)
        out, lse = torch.empty_like(q), torch.empty(DECODES, QUERY_HEADS)
        for context in CONTEXTS:
            k = torch.randn(1, DECODES * context, HEAD_DIM, dtype=dtype)
            v = torch.randn_like(k)
            rows = list(range(DECODES))
            calls = {
                split: lambda batch=DecodeBatch.of(rows, runs(context, split), "cpu"): backend.decode_attention(
                    q, k, v, batch, out, lse
                )
                for split in (False, True)
            }
            times = median_times(calls, repeats=150)  # in turn: a change of the machine's speed falls on both
            one, two = 1e6 * times[False], 1e6 * times[True]
            key = f"{str(dtype).removeprefix('torch.')}/{context}"
            results[key] = {"one_run_us": one, "two_runs_us": two, "extra_per_split_decode_us": (two - one) / DECODES}
            print(
                f"{backend.name:11s} {key:15s} one run {one:7.1f} us, two runs {two:7.1f} us: "
                f"{(two - one) / DECODES:+6.1f} us per decode per layer",
                flush=True,
            )
    write_results("split_kv.json", {"benchmark": "split_kv", "decodes": DECODES, "layers": results})


if __name__ == "__main__":
    main()
