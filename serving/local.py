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
from collections.abc import Callable
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
        return stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM (a graceful stop), then SIGKILL after `timeout` seconds; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_ready(proc: subprocess.Popen, url: str, ready_s: float, log: Callable[[], str], what: str) -> None:
    """Poll `url` until it answers 200; raise with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()[-4000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{what} not ready in {ready_s:.0f} s:\n{log()[-4000:]}")
        time.sleep(0.2)


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
    wait_ready(proc, f"{server.base}/v2/health/ready", ready_s, server.log, "server")
    return server


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
