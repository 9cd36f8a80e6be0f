"""The real model server (`python -m serving.server`) in a subprocess on 127.0.0.1, stopped by PID.

    with live_server(checkpoint, {"model_name": "omni", "limits": {...}}, env={"OMNI_API_TOKEN": t}) as base:
        requests.get(f"{base}/v2/health/ready")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml

from tests.s3_server import free_ports

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def live_server(checkpoint: Path, serving: dict, env: dict[str, str] | None = None,
                ready_s: float = 60) -> Iterator[str]:
    """Serve `checkpoint` with the ServingConfig keys `serving`; yields the base URL."""
    (port,) = free_ports(1)
    conf = checkpoint.parent / f"serving-{port}.yaml"
    conf.write_text(yaml.safe_dump(serving))
    log_path = checkpoint.parent / f"server-{port}.log"
    cmd = [sys.executable, "-m", "serving.server", "--model-dir", str(checkpoint),
           "--http-port", str(port), "--serving-config", str(conf)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, log_path, ready_s)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, base: str, log_path: Path, ready_s: float) -> None:
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready in {ready_s:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
