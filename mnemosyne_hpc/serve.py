"""OpenAI-compatible HTTP server on rank 0; every other rank follows its step plans.

    launch/mpirun.sh -n 2 python -m mnemosyne_hpc.serve parallel.tp=2 server.port=8000

Endpoints: POST /v1/completions and /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, /health and /metrics (Prometheus). Requests from all clients share the
engine's continuous batches. A bad request gets a 4xx with a message; nothing else is affected.
SIGTERM or SIGINT on rank 0 stops it cleanly: new requests get 503, those in flight have
server.shutdown_grace_s to finish (a second signal ends them at once), then every rank exits with status 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn  # imported before the ranks join: the others wait for rank 0's first plan

from mnemosyne_hpc.config import Config, compose_command_line
from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.runtime import run, stopped_at_start
from mnemosyne_hpc.serving.api import create_app
from mnemosyne_hpc.serving.loop import ServingLoop


def model_name(cfg: Config) -> str:
    return cfg.server.model_name or Path(cfg.model.path).stem


def serve(cfg: Config, engine: Engine) -> None:
    loop = ServingLoop(engine, heartbeat_s=cfg.parallel.timeout_s / 4)
    app = create_app(loop, model_name(cfg), cfg.server)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=cfg.server.host, port=cfg.server.port, log_level="warning", timeout_graceful_shutdown=5
        )
    )
    with stopped_by_signals(loop, cfg.server.shutdown_grace_s):  # before anyone knows the address
        if stopped_at_start():
            print("[rank 0] stopped while starting: not serving; every rank shuts down", file=sys.stderr, flush=True)
            return
        http = threading.Thread(target=server.run, name="http", daemon=True)
        http.start()
        while not server.started:
            if not http.is_alive():
                raise RuntimeError(f"the HTTP server could not start on {cfg.server.host}:{cfg.server.port}")
            time.sleep(0.05)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        address = f"http://{socket.gethostname() if host == '0.0.0.0' else host}:{port}"
        if cfg.server.address_file:
            Path(cfg.server.address_file).write_text(address + "\n")
        print(f"serving {model_name(cfg)} at {address}/v1", file=sys.stderr, flush=True)
        try:
            loop.run()
        finally:
            server.should_exit = True  # the answers' last events are out: uvicorn lets them reach the clients
            http.join(timeout=10)
    print("[rank 0] stopped serving; every rank shuts down", file=sys.stderr, flush=True)


@contextmanager
def stopped_by_signals(loop: ServingLoop, grace_s: float):
    """Within, SIGTERM or SIGINT stops `loop` with `grace_s` seconds for the requests in flight; a second
    one ends them at once. The handler writes with os.write: a signal may arrive while this thread holds
    the lock of sys.stderr. After, both are ignored (the job is stopping), and the handler no longer
    keeps the loop, and through it the process groups, alive (see runtime._leave)."""

    def stop(signum, frame):
        if loop.stopping:
            news = "ending the requests in flight now"
        else:
            news = f"refusing new requests; those in flight have {grace_s:g} s to finish (a second signal: now)"
        loop.stop(grace_s)
        os.write(2, f"[rank 0] {signal.Signals(signum).name}: {news}\n".encode())

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> None:
    cfg = compose_command_line(argv)
    run(cfg, lambda engine: serve(cfg, engine), stop_signals=(signal.SIGINT, signal.SIGTERM))


if __name__ == "__main__":
    main()
