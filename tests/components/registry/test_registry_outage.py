"""A registry outage in the middle of the lifecycle steps, against a real `mlflow server` (sqlite
backend, artifacts proxied by the server) on 127.0.0.1, stopped by PID and started again on the same
store. The step retries with backoff (MLflow's client, set short here), then fails with one clear
error; a re-run completes, and no version is left without its tags and aliases."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import urllib3
from mlflow import MlflowClient

from components.config import load_config
from components.registry import tracking
from components.steps import lifecycle
from tests.s3_server import free_ports


class MlflowServer:
    """`mlflow server` in its own process group (it runs uvicorn as a child): stopped by that PID."""

    def __init__(self, root: Path):
        self.root = root
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, ready_s: float = 120) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        with (self.root / "server.log").open("a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (it takes a while to start); each test stops and restarts it."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def model(request) -> str:
    """A registered model per test, so tests sharing the server do not see each other's versions."""
    return "outage-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-60:]


@pytest.fixture()
def short_retries(monkeypatch) -> list[float]:
    """MLflow's client retries (2, exponential backoff) kept short; the backoff times it waited."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    waits: list[float] = []
    real = urllib3.util.retry.Retry.get_backoff_time

    def recorded(self):
        waits.append(real(self))
        return waits[-1]

    monkeypatch.setattr(urllib3.util.retry.Retry, "get_backoff_time", recorded)
    return waits


@pytest.fixture()
def cfg(server, tmp_path, model):
    if server.proc is None or server.proc.poll() is not None:  # an earlier test failed while it was down
        server.start()
    return load_config([f"tracking.uri={server.url}", f"tracking.registered_model={model}",
                        f"run.workdir={tmp_path / 'work'}", "cluster.endpoint.mlflow_artifacts_root=s3://mlflow"])


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "model.safetensors").write_bytes(os.urandom(2048))
    (path / "omni_config.json").write_text("{}")
    return path


def _stop_on(monkeypatch, server: MlflowServer, method: str, when=lambda *a: True):
    """The server goes away just before the client's `method` is called (whenever `when` holds);
    returns the undo."""
    real = getattr(MlflowClient, method)

    def outage(self, *args, **kwargs):
        if when(*args):
            server.stop()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, outage)
    return lambda: monkeypatch.setattr(MlflowClient, method, real)


def _assert_complete(uri: str, model: str, version: str) -> None:
    """One version in the registry, with every lineage and metric tag, and `challenger` on it."""
    versions = tracking.client(uri).search_model_versions(f"name='{model}'")
    assert [str(v.version) for v in versions] == [version]
    tags = versions[0].tags
    assert set(tracking.LINEAGE_TAGS) <= set(tags) and tags["metric.mcq_accuracy"] == "0.5"
    assert str(tracking.get_alias_version(uri, model, tracking.CHALLENGER).version) == version


@pytest.mark.slow
@pytest.mark.parametrize("stop_before", ["create_model_version", "set_registered_model_alias"])
def test_register_survives_the_server_going_away(server, cfg, model, checkpoint, short_retries, monkeypatch,
                                                 stop_before):
    parent = lifecycle.start_tracking(cfg, "pipe-1")
    register = lambda: lifecycle.register(cfg, checkpoint, {"mcq_accuracy": 0.5}, "d" * 64, parent, "pipe-1")  # noqa: E731
    undo = _stop_on(monkeypatch, server, stop_before)
    with pytest.raises(tracking.RegistryUnavailable) as err:
        register()
    message = str(err.value)
    assert f"registering {model}: the MLflow server at {server.url} did not answer after 2 retries with backoff" \
        in message and "re-run this step" in message
    assert len(short_retries) >= 2 and short_retries[0] < short_retries[1], short_retries  # retried, backing off
    undo()

    server.start()
    uri = server.url
    left = tracking.client(uri).search_model_versions(f"name='{model}'")
    if stop_before == "create_model_version":
        assert left == []  # nothing registered: nothing half-written
    else:  # created with all its tags in one request; only the alias is missing until the re-run
        assert len(left) == 1 and set(tracking.LINEAGE_TAGS) <= set(left[0].tags)
    version = register()  # the re-run: completes the earlier attempt's version rather than adding one
    _assert_complete(uri, model, version)



@pytest.mark.slow
def test_promote_survives_the_server_going_away(server, cfg, model, checkpoint, short_retries, monkeypatch, tmp_path):
    """Stopped between the two alias moves of `crown` (previous-champion moved, champion not yet):
    the champion stays where it was until the re-run moves it."""
    parent = lifecycle.start_tracking(cfg, "pipe-2")
    first = lifecycle.register(cfg, checkpoint, {"mcq_accuracy": 0.5}, "d" * 64, parent, "pipe-2")
    lifecycle.promote(cfg, first, tmp_path / "isvc")
    second = lifecycle.register(cfg, checkpoint, {"mcq_accuracy": 0.6}, "d" * 64, parent, "pipe-2")
    undo = _stop_on(monkeypatch, server, "set_registered_model_alias", lambda name, alias, v: alias == "champion")
    with pytest.raises(tracking.RegistryUnavailable, match=f"promoting version {second} to champion: the MLflow "
                                                           "server .* did not answer after 2 retries"):
        lifecycle.promote(cfg, second, tmp_path / "isvc")
    undo()
    server.start()
    uri = server.url
    assert str(tracking.get_alias_version(uri, model, tracking.CHAMPION).version) == first  # unchanged
    lifecycle.promote(cfg, second, tmp_path / "isvc")  # the re-run
    assert str(tracking.get_alias_version(uri, model, tracking.CHAMPION).version) == second
    assert str(tracking.get_alias_version(uri, model, tracking.PREVIOUS_CHAMPION).version) == first
    for v in tracking.client(uri).search_model_versions(f"name='{model}'"):
        assert set(tracking.LINEAGE_TAGS) <= set(v.tags)
