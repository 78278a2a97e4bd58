"""The served OpenAPI schema is what the server does: schemathesis reads /openapi.json of a running
2-rank server (a tiny text model) and sends every operation schema-valid and schema-invalid requests,
a bounded and seeded run: no 5xx, no status the schema does not list, no answer outside its schema."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from models import make_tiny_text_model
from ranks import tiny_overrides
from servers import kill_job, rank_pids, start_server

KEY = "fuzz-key"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path):
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if schemathesis is None:
        pytest.skip("schemathesis is not installed (it comes with the project's test extras)")
    model_dir = make_tiny_text_model(tmp_path / "llama", max_position_embeddings=256)
    overrides = tiny_overrides(model_dir, **{"parallel.kvp": 2, "cache.max_model_len": 0, "server.api_key": KEY})
    address, process = start_server(tmp_path, overrides)
    try:
        run = subprocess.run(
            [
                schemathesis,
                "run",
                f"{address}/openapi.json",
                f"--checks={CHECKS}",
                "--max-examples=30",
                "--seed=1",
                "--workers=1",
                "--generation-database=none",
                "--request-timeout=60",
                f"--header=Authorization: Bearer {KEY}",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # where it keeps its cache
        )
        print(run.stdout[-3000:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert process.poll() is None
    finally:
        if process.poll() is None:
            os.kill(rank_pids(process.pid)[0], signal.SIGTERM)
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                kill_job(process)
