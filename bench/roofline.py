"""This machine's ceilings, and how close one engine rank (all cores, bf16) comes to them.

    .venv/bin/python bench/roofline.py
    python bench/roofline.py --device cuda --model llama3-8b-8l   # one GPU


Ceilings, each the best median over a few shapes: GEMM throughput in fp32 and bf16 (AMX), and
memory read bandwidth (a bf16 GEMV and an fp32 sum over 1 GiB), measured before and after the
engine runs; the higher of the two is the ceiling. The engine, on random-weight
Llamas:
- prefill MFU: model FLOPs of an 8k and a 16k-token prompt / TTFT / bf16 GEMM peak, on a model with
  2048-wide layers (Llama-3.2-1B's shape, 4 layers; on a GPU, `--model llama3-8b-8l`: 8 layers of
  Llama-3-8B's shape, big enough that a GPU's GEMMs, not launches, set the time);
- decode bandwidth utilisation: the bytes a step must read (weights and KV) / TBT / read
  bandwidth, on the same model at 16k context and on a model whose KV dominates at 128k context.
A torch profile of each engine run says where the time goes, and the prefill attention kernel is
timed against torch's CPU flash kernel on the same model's attention (causal, 32 query heads over 8
KV heads of 64); on a GPU, the Triton decode kernel's read bandwidth over one long sequence's KV.
Writes bench/results/roofline.json (roofline_cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (
    llama,
    llama_bytes,
    llama_flops,
    random_llama,
    random_prompt,
    run_in_process,
    timed_requests,
    write_results,
)
from mnemosyne_hpc.kernels import triton_decode
from mnemosyne_hpc.kernels.prefill import prefill_attention
from mnemosyne_hpc.model.attention import DecodeBatch
from mnemosyne_hpc.perf.timing import median_time

WIDE = llama(4, 2048, 8192, 32, 8, 64, vocab=32000, positions=1 << 17, rope_theta=500000.0)
# Small projections, 4 KB of KV per token: at 128k context a decode step reads 512 MiB of KV.
LLAMA3_8B_8L = llama(8, 4096, 14336, 32, 8, 128, vocab=128256, positions=1 << 17, rope_theta=500000.0)
MODELS = {"llama-4x2048": WIDE, "llama3-8b-8l": LLAMA3_8B_8L}
LONG_KV = llama(2, 256, 512, 4, 4, 128, vocab=1024, positions=1 << 20, rope_theta=1e7)
GEMM_SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096), (8192, 2048, 2048), (8192, 8192, 2048)]  # (m, n, k)
GPU_GEMM_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 14336, 4096)]
PROFILE_ROWS = 12


def gemm_peak(dtype: torch.dtype, repeats: int, device: str) -> dict:
    rates = {}
    for m, n, k in GEMM_SHAPES if device == "cpu" else GPU_GEMM_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
        rates[f"{m}x{n}x{k}"] = 2 * m * n * k / median_time(lambda: F.linear(a, b), repeats, device) / 1e9
    return {"gflops_by_shape": rates, "peak_gflops": max(rates.values())}


def read_bandwidth(repeats: int, device: str) -> dict:
    gib = 1 if device == "cpu" else 4  # on a GPU, enough that a kernel launch is lost in the time
    matrix = torch.randn(gib * 2**29 // 4096, 4096, dtype=torch.bfloat16, device=device)
    vector = torch.randn(4096, dtype=torch.bfloat16, device=device)
    flat = torch.randn(gib * 2**28, dtype=torch.float32, device=device)
    rates = {
        "bf16_gemv": matrix.nbytes / median_time(lambda: matrix @ vector, repeats, device) / 1e9,
        "fp32_sum": flat.nbytes / median_time(lambda: flat.sum(), repeats, device) / 1e9,
    }
    return {"gbs_by_kernel": rates, "peak_gbs": max(rates.values())}


def attention_kernels(model: dict, lengths: list[int], repeats: int) -> dict:
    """Causal prefill attention over one layer's heads: our kernel against torch's flash kernel."""
    results = {}
    hq, hkv, d = model["num_attention_heads"], model["num_key_value_heads"], model["head_dim"]
    probe = torch.randn(hq, 64, d, dtype=torch.bfloat16)
    if prefill_attention(probe, probe[:hkv], probe[:hkv], causal=True) is None:
        print("prefill attention: no AMX kernel on this machine, so nothing to compare", flush=True)
        return results
    for tokens in lengths:
        q = torch.randn(hq, tokens, d, dtype=torch.bfloat16)
        k, v = torch.randn(2, hkv, tokens, d, dtype=torch.bfloat16)
        flops = 4 * d * hq * tokens * (tokens + 1) / 2  # QKᵀ and PV over the causal triangle
        ours = median_time(lambda: prefill_attention(q, k, v, causal=True), repeats)
        torch_flash = median_time(
            lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], k[None], v[None], 0.0, True),
            repeats,
        )
        results[f"causal_{tokens}"] = {
            "ours_s": ours,
            "torch_flash_s": torch_flash,
            "ours_gflops": flops / ours / 1e9,
            "torch_flash_gflops": flops / torch_flash / 1e9,
            "speedup": torch_flash / ours,
        }
        print(
            f"prefill attention {tokens:7d}: ours {flops / ours / 1e9:5.0f} GFLOP/s, torch flash "
            f"{flops / torch_flash / 1e9:5.0f} GFLOP/s ({torch_flash / ours:.2f}x)",
            flush=True,
        )
    return results


def decode_kernel_bandwidth(model: dict, contexts: list[int], repeats: int) -> dict:
    """On a GPU: the Triton decode kernel over one sequence's KV in one run of slots (one layer of
    `model`), as the bytes of keys and values it reads per second."""
    results = {}
    hq, hkv, d = model["num_attention_heads"], model["num_key_value_heads"], model["head_dim"]
    for n in contexts:
        k, v = torch.randn(2, hkv, n, d, dtype=torch.bfloat16, device="cuda")
        q = torch.randn(1, hkv, hq // hkv, d, dtype=torch.bfloat16, device="cuda")
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="cuda")
        splits = DecodeBatch.of([0], [[(0, n)]], "cuda").splits
        if not triton_decode.decode_attention_into(q, k, v, splits, out, lse):  # else the timing would be of nothing
            raise RuntimeError("the Triton decode kernel does not apply here (is Triton installed?)")
        seconds = median_time(lambda: triton_decode.decode_attention_into(q, k, v, splits, out, lse), repeats, "cuda")
        results[f"decode_{n}"] = {"seconds": seconds, "gbs": 2 * k.nbytes / seconds / 1e9}
        print(
            f"decode attention {n:8d} keys: {1e6 * seconds:7.1f} µs, {2 * k.nbytes / seconds / 1e9:6.0f} GB/s",
            flush=True,
        )
    return results


def profile_table(function, device: str) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        function()
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS)


def engine_overrides(model_dir: Path, max_len: int, chunk: int, device: str, kv_memory_gib: float) -> list[str]:
    return [
        "model=hf",
        f"model.path={model_dir}",
        "model.dtype=bfloat16",
        f"cache.max_model_len={max_len}",
        f"cache.kv_memory_gib={kv_memory_gib}",
        "scheduler.chunking=fixed",
        "scheduler.priority=fcfs",
        f"scheduler.chunk_size={chunk}",
        f"scheduler.max_num_batched_tokens={chunk}",
        "parallel.timeout_s=3600",
        f"parallel.device={device}",
    ]


def measure_ceilings(repeats: int, device: str) -> dict:
    ceilings = {
        "gemm_fp32": gemm_peak(torch.float32, repeats, device),
        "gemm_bf16": gemm_peak(torch.bfloat16, repeats, device),
        "memory_read": read_bandwidth(repeats, device),
    }
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name()
    print(
        f"GEMM peak fp32 {ceilings['gemm_fp32']['peak_gflops']:.0f} GFLOP/s, "
        f"bf16 {ceilings['gemm_bf16']['peak_gflops']:.0f} GFLOP/s; memory read "
        f"{ceilings['memory_read']['peak_gbs']:.1f} GB/s ({where})",
        flush=True,
    )
    return ceilings


def measure_engine(
    model: dict,
    model_dir: Path,
    prefill_lengths: list[int],
    decode_context: int,
    decode_steps: int,
    chunk: int,
    device: str,
    kv_memory_gib: float,
) -> dict:
    """TTFT (and FLOP/s) of each prefill length, then TBT (and GB/s) at `decode_context`."""
    results = {}

    def leader(engine) -> None:
        for tokens in prefill_lengths:
            request = {
                "prompt_token_ids": random_prompt(tokens, tokens, model["vocab_size"]),
                "max_tokens": 1,
                "ignore_eos": True,
            }
            ttft, _ = timed_requests(engine, [request])
            flops = llama_flops(model, tokens)
            results[f"prefill_{tokens}"] = {
                "ttft_s": ttft,
                "model_tflop": flops / 1e12,
                "achieved_gflops": flops / ttft / 1e9,
            }
            print(f"prefill {tokens:7d}: TTFT {ttft:7.2f} s, {flops / ttft / 1e9:6.0f} GFLOP/s", flush=True)
        request = {
            "prompt_token_ids": random_prompt(decode_context, 1, model["vocab_size"]),
            "max_tokens": decode_steps + 1,
            "ignore_eos": True,
        }
        _, [output] = timed_requests(engine, [request])
        tbt = statistics.median(output["tbt_s"])
        step_bytes = llama_bytes(model, decode_context + decode_steps // 2)
        results[f"decode_{decode_context}"] = {
            "ttft_s": output["ttft_s"],
            "tbt_median_s": tbt,
            "tbt_s": output["tbt_s"],
            "gb_per_step": step_bytes / 1e9,
            "achieved_gbs": step_bytes / tbt / 1e9,
        }
        print(f"decode at {decode_context}: TBT {1e3 * tbt:.1f} ms, {step_bytes / tbt / 1e9:.1f} GB/s", flush=True)
        if prefill_lengths:
            longest = {
                "prompt_token_ids": random_prompt(prefill_lengths[-1], 2, model["vocab_size"]),
                "max_tokens": 1,
                "ignore_eos": True,
            }
            results["profile_prefill"] = profile_table(lambda: timed_requests(engine, [longest]), device)
        request_id = engine.add_request(
            random_prompt(decode_context, 3, model["vocab_size"]), {"max_tokens": decode_steps + 1, "ignore_eos": True}
        )
        while request_id not in [r.id for r in engine.step().sampled]:  # its prefill
            pass
        results["profile_decode"] = profile_table(lambda: [engine.step() for _ in range(decode_steps)], device)

    max_len = max(prefill_lengths + [decode_context]) + decode_steps + 1
    run_in_process(engine_overrides(model_dir, max_len, chunk, device, kv_memory_gib), leader)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="one engine rank on this")
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="llama-4x2048",
        help="the model of the prefill MFU and of the first decode",
    )
    parser.add_argument("--kv-memory-gib", type=float, default=1.5, help="the engine's KV cache")
    parser.add_argument("--prefill", type=int, nargs="+", default=[8192, 16384], help="prompt lengths for MFU")
    parser.add_argument("--decode-context", type=int, default=16384, help="context of the wide model's decode")
    parser.add_argument("--long-context", type=int, default=131072, help="context of the KV-heavy model's decode")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench"))
    args = parser.parse_args()

    model, device = MODELS[args.model], args.device
    before = measure_ceilings(args.repeats, device)
    kernels = attention_kernels(model, args.prefill, args.repeats) if device == "cpu" else {}
    decode_kernel = (
        {}
        if device == "cpu"
        else decode_kernel_bandwidth(model, [args.decode_context, args.long_context], args.repeats)
    )
    wide = measure_engine(
        model,
        random_llama(args.workdir / args.model, **model),
        args.prefill,
        args.decode_context,
        args.decode_steps,
        args.chunk,
        device,
        args.kv_memory_gib,
    )
    long_kv = measure_engine(
        LONG_KV,
        random_llama(args.workdir / "llama-kvp-2x256-hd128", **LONG_KV),
        [],
        args.long_context,
        args.decode_steps,
        args.chunk,
        device,
        args.kv_memory_gib,
    )
    after = measure_ceilings(args.repeats, device)
    # A busy moment on a shared machine lowers a ceiling and would flatter the ratios: take the higher.
    gemm_gflops = max(c["gemm_bf16"]["peak_gflops"] for c in (before, after))
    read_gbs = max(c["memory_read"]["peak_gbs"] for c in (before, after))
    for n in args.prefill:
        wide[f"prefill_{n}"]["mfu"] = wide[f"prefill_{n}"]["achieved_gflops"] / gemm_gflops
    for decode in (wide[f"decode_{args.decode_context}"], long_kv[f"decode_{args.long_context}"]):
        decode["bandwidth_utilisation"] = decode["achieved_gbs"] / read_gbs
    ratios = {f"mfu_prefill_{n}": wide[f"prefill_{n}"]["mfu"] for n in args.prefill}
    ratios.update({f"prefill_attention_{name}_ours_over_torch_flash": r["speedup"] for name, r in kernels.items()})
    ratios[f"bandwidth_decode_{args.decode_context}_wide"] = wide[f"decode_{args.decode_context}"][
        "bandwidth_utilisation"
    ]
    ratios[f"bandwidth_decode_{args.long_context}_long_kv"] = long_kv[f"decode_{args.long_context}"][
        "bandwidth_utilisation"
    ]
    record = {
        "benchmark": "roofline",
        "device": device,
        "threads": torch.get_num_threads(),
        "ceilings": {"bf16_gemm_gflops": gemm_gflops, "read_gbs": read_gbs, "before": before, "after": after},
        "wide_model": model,
        "prefill_attention": kernels,
        "wide": wide,
        "long_kv_model": LONG_KV,
        "long_kv": long_kv,
        "ratios": ratios,
    }
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
        record["decode_attention_kernel"] = decode_kernel
        ratios.update({f"{name}_attention_kernel_bandwidth": r["gbs"] / read_gbs for name, r in decode_kernel.items()})
    write_results("roofline.json" if device == "cpu" else "roofline_cuda.json", record)


if __name__ == "__main__":
    main()
