"""The predictor as a local process: `python -m serving.server` on a free 127.0.0.1 port with a
serving config, waited for until ready, stopped by its PID (SIGTERM, then SIGKILL). The serving
tests and the serving benchmark use it; traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]  # the checkout: `python -m serving.server` runs from here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    base: str  # http://127.0.0.1:PORT
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(checkpoint: Path, workdir: Path, config: dict, threads: int = 1, ready_s: float = 90) -> LiveServer:
    """Start the server on `checkpoint` with `config` (ServingConfig keys) and wait until it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / f"serving-{port}.yaml"
    conf.write_text(yaml.safe_dump(config))
    log_path = workdir / f"server-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "serving.server", "--model-dir", str(checkpoint), "--http-port", str(port),
           "--serving-config", str(conf)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if requests.get(f"{server.base}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not ready in {ready_s:.0f} s:\n{server.log()[-3000:]}")
        time.sleep(0.2)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0
