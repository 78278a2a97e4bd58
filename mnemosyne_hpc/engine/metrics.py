"""Per-request latency records (one JSON line each) and the aggregates of a run."""

from __future__ import annotations

import numpy as np

from mnemosyne_hpc.engine.request import Request


def request_record(request: Request, start: float) -> dict:
    """Times in seconds; arrival, first token and finish relative to `start` (the run's start)."""
    return {
        "id": request.id,
        "prompt_tokens": len(request.prompt_token_ids),
        "cached_tokens": request.cached_tokens,
        "output_tokens": len(request.output_token_ids),
        "arrival_s": request.arrival - start,
        "first_token_s": request.token_times[0] - start if request.token_times else None,
        "finish_s": request.finish_time - start if request.finish_time is not None else None,
        "ttft_s": request.ttft_s,
        "tbt_s": request.tbt_s,
        "preemptions": request.preemptions,
        "finish_reason": request.finish_reason,
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def summarize(records: list[dict], tbt_slo_s: float) -> dict:
    """p50/p90/p99 of TTFT and TBT, throughput over the run, and TBT SLO attainment."""
    if not records:
        return {"requests": 0}
    tbts = [t for r in records for t in r["tbt_s"]]
    first = min(r["arrival_s"] for r in records)
    duration = max(r["finish_s"] for r in records) - first
    output_tokens = sum(r["output_tokens"] for r in records)
    return {
        "requests": len(records),
        "duration_s": duration,
        "ttft_s": _percentiles([r["ttft_s"] for r in records if r["ttft_s"] is not None]),
        "tbt_s": _percentiles(tbts),
        "output_tokens_per_s": output_tokens / duration if duration > 0 else None,
        "requests_per_s": len(records) / duration if duration > 0 else None,
        "tbt_slo_s": tbt_slo_s,
        "tbt_within_slo": sum(t <= tbt_slo_s for t in tbts) / len(tbts) if tbts else None,
        "requests_within_slo": sum(all(t <= tbt_slo_s for t in r["tbt_s"]) for r in records) / len(records),
        "preemptions": sum(r["preemptions"] for r in records),
    }


def format_summary(summary: dict) -> str:
    if not summary.get("requests"):
        return "no requests finished"

    def ms(p):
        return "/".join("-" if summary[p][k] is None else f"{1000 * summary[p][k]:.1f}" for k in ("p50", "p90", "p99"))

    return (
        f"{summary['requests']} requests in {summary['duration_s']:.2f} s, "
        f"{summary['output_tokens_per_s'] or 0:.1f} output tokens/s; TTFT p50/p90/p99 {ms('ttft_s')} ms; "
        f"TBT p50/p90/p99 {ms('tbt_s')} ms; TBT within the {1000 * summary['tbt_slo_s']:g} ms SLO: "
        f"{100 * (summary['tbt_within_slo'] or 0):.1f}% of tokens, {100 * summary['requests_within_slo']:.1f}% "
        f"of requests; {summary['preemptions']} preemptions"
    )
