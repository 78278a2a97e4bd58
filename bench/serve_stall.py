"""Streams while a long prompt arrives: the time between tokens of 8 short streams, as their clients see
it, with and without a 200k-token text prompt sent to the same server meanwhile; rounds alternate,
so both are measured side by side.

    python bench/serve_stall.py          # starts a server (2 ranks, KVP=2, the embedded SmolLM2) per
                                         # server.tokenizer_nice in --nice (default: 0 and 19)
    python bench/serve_stall.py --address URL --api-key KEY --results DIR    # drives a running server

The long prompt is longer than cache.max_model_len, so the server refuses it once it is tokenised: what
is measured is its arrival (upload, JSON, tokenising), not its prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_results  # noqa: E402

SERVER = ["parallel.kvp=2", "cache.max_model_len=1024", "scheduler.max_num_seqs=64"]


async def stream(client: httpx.AsyncClient, request: dict) -> list[float]:
    """The gaps between the tokens of one streamed completion."""
    arrivals = []
    async with client.stream("POST", "/v1/completions", json=request) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                arrivals.append(time.perf_counter())
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


async def one_round(client: httpx.AsyncClient, args, long_prompt: str | None) -> tuple[list[float], dict]:
    request = {"prompt": "Once upon a time", "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
    streams = [asyncio.create_task(stream(client, request)) for _ in range(args.streams)]
    arrival = {}
    if long_prompt is not None:
        await asyncio.sleep(args.delay_s)  # the streams are decoding
        started = time.perf_counter()
        response = await client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
        arrival = {"status": response.status_code, "seconds": time.perf_counter() - started}
        if response.status_code != 400:
            raise RuntimeError(f"the long prompt should be refused for its length: {response.text[:300]}")
    gaps = [gap for task in streams for gap in await task]
    return gaps, arrival


def summary(gaps: list[float]) -> dict:
    ordered = sorted(gaps)
    return {
        "gaps": len(ordered),
        "tbt_p50_ms": 1e3 * ordered[len(ordered) // 2],
        "tbt_p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "tbt_max_ms": 1e3 * ordered[-1],
    }


async def measure(args) -> dict:
    long_prompt = "word " * args.long_tokens  # one token per word for SmolLM2's tokenizer
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    gaps: dict[str, list[float]] = {"without": [], "with": []}
    arrivals = []
    async with httpx.AsyncClient(base_url=args.address, headers=headers, timeout=300) as client:
        for round_ in range(args.rounds):
            for condition in ("without", "with"):
                found, arrival = await one_round(client, args, long_prompt if condition == "with" else None)
                gaps[condition] += found
                if arrival:
                    arrivals.append(arrival)
                print(f"round {round_ + 1} {condition:7s} {summary(found)}", flush=True)
    without, with_long = summary(gaps["without"]), summary(gaps["with"])
    return {
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "long_prompt_words": args.long_tokens,
        "rounds": args.rounds,
        "without_long_prompt": without,
        "with_long_prompt": with_long,
        "long_prompt_arrivals": arrivals,
        "ratios": {
            "tbt_p99_with_over_without": with_long["tbt_p99_ms"] / without["tbt_p99_ms"],
            "tbt_p50_with_over_without": with_long["tbt_p50_ms"] / without["tbt_p50_ms"],
        },
    }


def start_server(directory: Path, overrides: list[str]) -> tuple[str, subprocess.Popen]:
    address_file = directory / "address"
    command = [str(ROOT / "launch" / "mpirun.sh"), "-n", "2", sys.executable, "-m", "mnemosyne_hpc.serve", *overrides]
    process = subprocess.Popen([*command, "server.port=0", f"server.address_file={address_file}"], cwd=ROOT)
    while not (address_file.exists() and address_file.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)
    return address_file.read_text().strip(), process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="a running server; by default one is started")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--long-tokens", type=int, default=200_000)
    parser.add_argument("--delay-s", type=float, default=1.0, help="when the long prompt is sent in a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nice", type=int, nargs="+", default=[0, 19], help="server.tokenizer_nice values")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.address is not None:
        write_results("serve_stall.json", {**asyncio.run(measure(args)), "server": args.address}, args.results)
        return
    runs = {}
    for nice in args.nice:
        overrides = [*SERVER, f"server.tokenizer_nice={nice}"]
        args.address, server = start_server(Path(tempfile.mkdtemp()), overrides)
        try:
            runs[nice] = {**asyncio.run(measure(args)), "server": overrides}
        finally:
            server.terminate()
            server.wait(timeout=60)
    ratios = {f"nice{nice}_{key}": value for nice, run in runs.items() for key, value in run["ratios"].items()}
    write_results("serve_stall.json", {"runs": runs, "ratios": ratios}, args.results)


if __name__ == "__main__":
    main()
