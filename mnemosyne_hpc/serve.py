"""OpenAI-compatible HTTP server on rank 0; every other rank follows its step plans.

    launch/mpirun.sh -n 2 python -m mnemosyne_hpc.serve parallel.tp=2 server.port=8000

Endpoints: POST /v1/completions and /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, /health and /metrics (Prometheus). Requests from all clients share the
engine's continuous batches. A bad request gets a 4xx with a message; nothing else is affected.
SIGTERM or SIGINT on rank 0 stops it cleanly: every rank exits with status 0.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn  # imported before the ranks join: the others wait for rank 0's first plan

from mnemosyne_hpc.config import Config, compose_command_line
from mnemosyne_hpc.engine.engine import Engine
from mnemosyne_hpc.runtime import run
from mnemosyne_hpc.serving.api import create_app
from mnemosyne_hpc.serving.loop import ServingLoop


def model_name(cfg: Config) -> str:
    return cfg.server.model_name or Path(cfg.model.path).stem


def serve(cfg: Config, engine: Engine) -> None:
    loop = ServingLoop(engine, heartbeat_s=cfg.parallel.timeout_s / 4)
    app = create_app(loop, model_name(cfg), cfg.server.api_key)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=cfg.server.host, port=cfg.server.port, log_level="warning", timeout_graceful_shutdown=5
        )
    )
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

    def stop(signum, frame):
        loop.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        loop.run()
    finally:
        server.should_exit = True
        http.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    cfg = compose_command_line(argv)
    run(cfg, lambda engine: serve(cfg, engine), followers_ignore=(signal.SIGINT, signal.SIGTERM))


if __name__ == "__main__":
    main()
