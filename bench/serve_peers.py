"""This project's OpenAI-compatible server against vLLM's (CPU build), both driven by the same third-party
load generator, guidellm, on the same model (the embedded SmolLM2-135M-Instruct in bfloat16), the same
cores and the same synthetic workloads: all workloads on one server, then on the other, in one run.

    .venv/bin/python bench/serve_peers.py --vllm-python bench/.venv-vllm/bin/python \\
        --guidellm bench/.venv-guidellm/bin/guidellm

Workloads (guidellm's synthetic text, the same seeded prompts for both servers; `/v1/completions`,
streamed; 64 output tokens each, exact since guidellm sends `ignore_eos`):
- c1, c4, c16: 1, 4 and 16 concurrent streams of prompts of 64-256 tokens (mean 128);
- mix: 4 concurrent short streams as in c4, while a second guidellm process, started `--long-delay-s`
  later, sends a long prompt of 1500 tokens (`--long-requests` of them, one at a time); the record
  says whether each ran within the short streams' window.
Per workload and server: TTFT p50/p99, ITL p50/p99 (guidellm's: a request's (last token - first
token) / (tokens - 1), over tokens), output tokens/s (all output tokens / the workload's duration),
requests completed and errored; for mix also the long requests' TTFT. Ratios are ours / vLLM (below 1
is better for TTFT and ITL, above 1 for throughput).

Our server's layout for these cores: each of `--layouts` is tried first at 4 streams, and the one with
the highest output tokens/s runs the workloads (`parallel.tp=2` is refused for this model: TP must
divide its 9 query and 3 KV heads). Both servers: max model length 2048, 16 sequences at once, 1 GiB of
KV cache (per rank for ours), prefix caching on (both defaults); vLLM compiles its model (its default).

guidellm sends `stream_options.continuous_usage_stats`, a vLLM extension our server refuses (400); its
own `extras` option leaves the field out, for both servers, so both get the same request bodies.

The two environments (neither is part of the default set-up):

    python3 -m venv bench/.venv-vllm
    bench/.venv-vllm/bin/pip install -r bench/requirements-vllm.txt
    bench/.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for another torch
    python3 -m venv bench/.venv-guidellm
    bench/.venv-guidellm/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \\
        -r bench/requirements-guidellm.txt  # or a local torch-2.13.0+cpu wheel in place of the index

(`--vllm-python` and `--guidellm` default to $VLLM_PYTHON and $GUIDELLM, else those paths.)
Writes bench/results/serve_peers.json; guidellm's own JSON and every log stay under `--workdir`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results  # noqa: E402

NAME = "smol"  # the model id both servers serve
CORES = os.cpu_count()
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SHORT = "prompt_tokens=128,prompt_tokens_stdev=64,prompt_tokens_min=64,prompt_tokens_max=256,output_tokens=64"
LONG = "prompt_tokens=1500,output_tokens=64"
WORKLOADS = {"c1": (1, 16), "c4": (4, 48), "c16": (16, 96), "mix": (4, 48)}  # streams, requests
# Our server's layouts: ranks, overrides, threads per rank (mpirun's ranks start with one thread).
LAYOUTS = {"n1": (1, [], CORES), "kvp2": (2, ["parallel.kvp=2"], CORES // 2)}
OURS = [
    "model.dtype=bfloat16",
    "cache.max_model_len=2048",
    "cache.kv_memory_gib=1",
    "scheduler.max_num_seqs=16",
    f"server.model_name={NAME}",
]
VLLM = ["--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "16", "--served-model-name", NAME]
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{CORES - 1}",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # by default vLLM keeps a core for itself
    "VLLM_NO_USAGE_STATS": "1",
}


def model_dir() -> Path:
    """The embedded model's safetensors conversion, which vLLM serves and guidellm tokenises with."""
    from mnemosyne_hpc.config import compose, resolve_cache_dir
    from mnemosyne_hpc.model.gguf import convert_gguf

    cfg = compose([])
    return convert_gguf(Path(cfg.model.path), resolve_cache_dir(cfg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited ({process.returncode}); see its log")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server at {url} did not start within {timeout_s} s")


def start_ours(layout: str, workdir: Path) -> tuple[str, subprocess.Popen, list[str]]:
    ranks, overrides, threads = LAYOUTS[layout]
    address = workdir / f"address-{layout}"
    address.unlink(missing_ok=True)
    command = [str(ROOT / "launch" / "mpirun.sh"), "-n", str(ranks), sys.executable, "-m", "mnemosyne_hpc.serve"]
    command += [*OURS, *overrides, "server.port=0", f"server.address_file={address}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = open(workdir / f"ours-{layout}.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while not (address.exists() and address.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError(f"our server ({layout}) exited; see {log.name}")
        time.sleep(0.5)
    url = address.read_text().strip()
    wait_healthy(url, process)
    return url, process, [f"OMP_NUM_THREADS={threads}", *command]


def start_vllm(python: str, model: Path, workdir: Path) -> tuple[str, subprocess.Popen, list[str]]:
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *VLLM]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = open(workdir / "vllm.log", "w")
    env = {**os.environ, **OFFLINE, **VLLM_ENV}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process)
    return url, process, [*(f"{k}={v}" for k, v in VLLM_ENV.items()), *command]


def stop(process: subprocess.Popen, url: str) -> None:
    """SIGTERM (to mpirun, or to vLLM's API server), then wait until the port is free."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    host, port = url.rsplit("/", 1)[-1].split(":")
    for _ in range(120):
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) != 0:
                return
        time.sleep(0.5)


def guidellm(args, url: str, data: str, streams: int, requests: int, out: Path) -> subprocess.Popen:
    """One guidellm run (concurrent streams, a fixed number of requests), writing its JSON to `out`."""
    backend = f"kind=openai_http,target={url},model={NAME},request_format=/v1/completions"
    backend += ",extras.body.stream_options.continuous_usage_stats=null"  # left out of the body
    command = [args.guidellm, "run", "--backend", backend, "--tokenizer", f"kind=huggingface_auto,model={args.model}"]
    command += ["--data", f"kind=synthetic_text,{data}", "--profile", f"kind=concurrent,streams={streams}"]
    command += ["--constraint", f"kind=max_requests,count={requests}", "--output", f"kind=json,path={out}"]
    # The prompts are made before the run starts; by default guidellm keeps making them in a process of its
    # own while it runs, taking most of a core from the server.
    command += ["--data-loader", f"kind=pytorch,samples={requests}"]
    command += ["--disable-console-interactive"]
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(command, env={**os.environ, **OFFLINE}, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, out: Path) -> dict:
    if process.wait() != 0:
        raise RuntimeError(f"guidellm failed ({process.returncode}); see {out.with_suffix('.log')}")
    return json.loads(out.read_text())["benchmarks"][0]


def run_once(args, url: str, data: str, streams: int, requests: int, out: Path) -> dict:
    return finish(guidellm(args, url, data, streams, requests, out), out)


def summary(bench: dict) -> dict:
    metrics = bench["metrics"]

    def percentile(name: str, p: str) -> float | None:
        return metrics[name]["successful"]["percentiles"].get(p) if metrics[name]["successful"]["count"] else None

    totals = metrics["request_totals"]
    return {
        "requests_completed": totals["successful"],
        "requests_errored": totals["errored"],
        "requests_incomplete": totals["incomplete"],
        "ttft_p50_ms": percentile("time_to_first_token_ms", "p50"),
        "ttft_p99_ms": percentile("time_to_first_token_ms", "p99"),
        "itl_p50_ms": percentile("inter_token_latency_ms", "p50"),
        "itl_p99_ms": percentile("inter_token_latency_ms", "p99"),
        "output_tokens_per_s": metrics["output_tokens_per_second"]["successful"]["mean"],
        "output_tokens": metrics["output_token_count"]["successful"]["total_sum"],
        "duration_s": bench["duration"],
    }


def busy_share(seconds: float = 3.0) -> float:
    """The share of the machine's CPU time that was busy over `seconds`: before a workload, with the
    server idle, what other users of the machine take."""

    def sample() -> tuple[int, int]:
        ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    total, idle = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 1 - (idle2 - idle) / max(1, total2 - total)


def scaled(requests: int, args) -> int:
    return max(2, round(requests * args.scale))


def run_workload(args, url: str, name: str, out_dir: Path) -> dict:
    streams, requests = WORKLOADS[name]
    busy = busy_share()
    short = guidellm(args, url, SHORT, streams, scaled(requests, args), out_dir / f"{name}.json")
    if name != "mix":
        return {**summary(finish(short, out_dir / f"{name}.json")), "busy_before": busy}
    time.sleep(args.long_delay_s)
    long = guidellm(args, url, LONG, 1, args.long_requests, out_dir / "mix-long.json")
    long_bench = finish(long, out_dir / "mix-long.json")
    short_bench = finish(short, out_dir / f"{name}.json")
    window = (short_bench["start_time"], short_bench["end_time"])
    long_requests = [
        {
            "ttft_ms": r["time_to_first_token_ms"],
            "itl_ms": r["inter_token_latency_ms"],
            "within_short_window": window[0] <= r["info"]["timings"]["request_start"]
            and r["info"]["timings"]["request_end"] <= window[1],
        }
        for r in long_bench["requests"]["successful"]
    ]
    return {
        **summary(short_bench),
        "busy_before": busy,
        "long": {**summary(long_bench), "prompt_tokens": 1500, "requests": long_requests},
    }


def run_server(args, url: str, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_once(args, url, SHORT, 4, 8, out_dir / "warmup.json")
    results = {}
    for name in args.workloads:
        results[name] = run_workload(args, url, name, out_dir)
        r = results[name]
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "long"), flush=True)
    return results


def probe_layouts(args) -> tuple[str, dict]:
    """Each layout at 4 streams; the one with the highest output tokens/s."""
    probes = {}
    for layout in args.layouts:
        url, server, _ = start_ours(layout, args.workdir)
        try:
            out = args.workdir / f"probe-{layout}"
            out.mkdir(exist_ok=True)
            run_once(args, url, SHORT, 4, 8, out / "warmup.json")
            probes[layout] = summary(run_once(args, url, SHORT, 4, args.probe_requests, out / "c4.json"))
        finally:
            stop(server, url)
        print(f"layout {layout}: {probes[layout]['output_tokens_per_s']:.1f} output tokens/s at 4 streams", flush=True)
    return max(probes, key=lambda k: probes[k]["output_tokens_per_s"]), probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", f"{ROOT}/bench/.venv-vllm/bin/python"))
    parser.add_argument("--guidellm", default=os.environ.get("GUIDELLM", f"{ROOT}/bench/.venv-guidellm/bin/guidellm"))
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["n1", "kvp2"])
    parser.add_argument("--probe-requests", type=int, default=16)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--servers", nargs="+", choices=["ours", "vllm"], default=["ours", "vllm"])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every workload's request count")
    parser.add_argument("--long-requests", type=int, default=1, help="long prompts in mix, one at a time")
    parser.add_argument("--long-delay-s", type=float, default=15.0, help="mix: the long prompts' start")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mnemosyne-bench/serve_peers"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.model = model_dir()
    started = time.time()

    servers, setup = {}, {}
    if "ours" in args.servers:
        layout, probes = probe_layouts(args) if len(args.layouts) > 1 else (args.layouts[0], {})
        url, server, command = start_ours(layout, args.workdir)
        try:
            print(f"ours ({layout}) at {url}", flush=True)
            setup["ours"] = {"layout": layout, "layout_probes_c4": probes, "command": command}
            servers["ours"] = run_server(args, url, args.workdir / "ours")
        finally:
            stop(server, url)
    if "vllm" in args.servers:
        url, server, command = start_vllm(args.vllm_python, args.model, args.workdir)
        try:
            print(f"vLLM at {url}", flush=True)
            version = subprocess.run(
                [args.vllm_python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            setup["vllm"] = {"version": version, "command": command}
            servers["vllm"] = run_server(args, url, args.workdir / "vllm")
        finally:
            stop(server, url)

    ratios = {}
    if len(servers) == 2:
        for name in args.workloads:
            for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tokens_per_s"):
                ours, vllm = servers["ours"][name][key], servers["vllm"][name][key]
                if ours is not None and vllm:
                    ratios[f"{name}_{key}_ours_over_vllm"] = ours / vllm
        if "mix" in args.workloads:
            ours, vllm = servers["ours"]["mix"]["long"], servers["vllm"]["mix"]["long"]
            if ours["ttft_p50_ms"] is not None and vllm["ttft_p50_ms"]:
                ratios["mix_long_ttft_p50_ms_ours_over_vllm"] = ours["ttft_p50_ms"] / vllm["ttft_p50_ms"]
    guidellm_version = json.loads((args.workdir / args.servers[0] / "warmup.json").read_text())["metadata"]
    write_results(
        "serve_peers.json",
        {
            "benchmark": "serve_peers",
            "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, its safetensors conversion), bfloat16",
            "load_generator": f"guidellm {guidellm_version['guidellm_version']}",
            "request": "/v1/completions, streamed, ignore_eos, stream_options.include_usage",
            "workloads": {
                name: {"streams": streams, "requests": scaled(requests, args), "data": SHORT}
                for name, (streams, requests) in WORKLOADS.items()
                if name in args.workloads
            },
            "mix_long": {"data": LONG, "requests": args.long_requests, "delay_s": args.long_delay_s, "streams": 1},
            "setup": setup,
            "servers": servers,
            "ratios": ratios,
            "run_s": time.time() - started,
            "notes": [
                "The servers ran one after the other on a machine shared with other work (busy_before: the "
                "share of CPU time busy over 3 s before each workload, the server idle); guidellm runs on "
                "the same cores as the server.",
                "ITL is guidellm's: per request, (last token - first token) / (tokens - 1); its p50 and p99 are "
                "over tokens, so a single long gap shows only as its request's average.",
                "guidellm's stream_options.continuous_usage_stats (a vLLM extension our server refuses) is "
                "left out of both servers' requests through guidellm's extras option.",
                "guidellm makes each run's prompts before the run starts (--data-loader samples = its "
                "requests); by default it keeps making them in a process of its own while the run goes on.",
                "mix: a second guidellm process sends the long prompts one at a time, started long_delay_s "
                "after the short streams' process; see long.requests[].within_short_window.",
            ],
        },
    )


if __name__ == "__main__":
    main()
