"""A large checkpoint loads after the port binds: the pod is live at once (so the liveness probe
leaves it alone) and ready only when the model is (so Knative sends it no traffic before). The real
`python -m serving.server` entry point runs in a subprocess, with the load held until the test says."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.s3_server import free_ports

REPO = Path(__file__).resolve().parents[2]
# The checkpoint "loads" when the release file appears: long enough to look at the server meanwhile.
_HELD_LOAD = """
import os, time
from pathlib import Path
from serving.predictor import OmniPredictor
def load(self):
    release = Path(os.environ["OMNI_TEST_RELEASE"])
    while not release.exists():
        time.sleep(0.05)
    if release.read_text() == "fail":
        raise RuntimeError("checkpoint is corrupt")
    self.ready = True
    return True
OmniPredictor.load = load
from serving.server import main
main()
"""


def _start(tmp_path: Path, port: int) -> tuple[subprocess.Popen, Path]:
    release = tmp_path / "release"
    cmd = [sys.executable, "-c", _HELD_LOAD, "--model-dir", str(tmp_path), "--http-port", str(port)]
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMNI_TEST_RELEASE": str(release)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, release


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.ConnectionError:
        return None


def _wait(cond, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None or cond(), f"server exited {proc.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out: {log.read_text()[-2000:]}"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """Graceful shutdown is not what these tests look at: kill the server by its PID."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_port_binds_before_the_model_loads_and_ready_follows_the_load(tmp_path) -> None:
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    proc, release = _start(tmp_path, port)
    log = tmp_path / "server.log"
    try:
        _wait(lambda: _status(f"{base}/v2/health/live") == 200, proc, log)
        assert _status(f"{base}/v2/health/ready") == 503  # loading: no traffic yet
        assert _status(f"{base}/v2/models/omni/ready") == 503
        release.write_text("go")
        _wait(lambda: _status(f"{base}/v2/health/ready") == 200, proc, log)
        assert _status(f"{base}/v2/models/omni/ready") == 200
    finally:
        _stop(proc)


def test_a_failed_load_ends_the_process_so_the_pod_restarts(tmp_path) -> None:
    (port,) = free_ports(1)
    proc, release = _start(tmp_path, port)
    log = tmp_path / "server.log"
    try:
        _wait(lambda: _status(f"http://127.0.0.1:{port}/v2/health/live") == 200, proc, log)
        release.write_text("fail")
        assert proc.wait(timeout=30) == 3
        assert "checkpoint is corrupt" in log.read_text()
    finally:
        _stop(proc)
