"""The chart's MLflow server command, run for real: the shell script of the rendered Deployment
(production values: basic auth on, artifacts proxied to S3) with its mounted Secrets as files, a
real S3 server (SeaweedFS) and a sqlite database in place of PostgreSQL. Only the paths, the bind
address and the port are changed for the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from components.cluster import render as cluster
from components.cluster.buckets import ensure_buckets
from tests.s3_server import free_ports, s3_server_fixture

s3_server = s3_server_fixture()
PRODUCTION = cluster.CHART_DIR / "ci" / "production-values.yaml"


def _secrets(root: Path, s3, db: Path) -> Path:
    files = {"db/dsn": f"sqlite:///{db}", "storage/S3_ENDPOINT_URL": f"http://{s3.endpoint}",
             "storage/AWS_ACCESS_KEY_ID": s3.access_key, "storage/AWS_SECRET_ACCESS_KEY": s3.secret_key,
             "auth/username": "omni-admin", "auth/password": "a-Long-pass-4-tests", "auth/secret_key": "csrf-key"}
    for name, value in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(value)
    return root


@pytest.fixture
def chart_mlflow(cfg, s3_server, tmp_path):
    docs, _ = cluster.render_chart(cfg, cluster.load_values(PRODUCTION))
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "omni-mlflow")
    server = deploy["spec"]["template"]["spec"]["containers"][0]
    (port,) = free_ports(1)
    secrets = _secrets(tmp_path / "secrets", s3_server, tmp_path / "mlflow.db")
    script = (server["args"][0].replace("/var/run/secrets/omni", str(secrets))
              .replace("/tmp/mlflow-auth.ini", str(tmp_path / "auth.ini"))
              .replace("--host 0.0.0.0", "--host 127.0.0.1").replace(f"--port {deploy_port(server)}", f"--port {port}")
              .replace("--workers 2", "--workers 1"))
    ensure_buckets([cfg.cluster.endpoint.mlflow_artifacts_root], s3_server.config())  # the init container's job
    env = {**os.environ, **{e["name"]: e["value"] for e in server["env"]}, "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = (tmp_path / "mlflow.log").open("w")
    proc = subprocess.Popen([*server["command"], script], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _get(f"{base}/health") != 200:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base, secrets
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started, by our own group id
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def deploy_port(container: dict) -> int:
    return container["ports"][0]["containerPort"]


def _get(url: str, **kw) -> int | None:
    try:
        return requests.get(url, timeout=5, **kw).status_code
    except requests.ConnectionError:
        return None


@pytest.mark.slow
def test_chart_mlflow_requires_a_login_and_stores_artifacts_on_s3(chart_mlflow, s3_server, monkeypatch, tmp_path):
    base, secrets = chart_mlflow
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(f"{base}/health") == 200  # the probes need no login
    assert _get(search) == 401
    login = ((secrets / "auth/username").read_text(), (secrets / "auth/password").read_text())
    assert _get(search, auth=("omni-admin", "wrong")) == 401
    assert _get(search, auth=login) == 200
    # What a pipeline task does with the Secret's keys as MLFLOW_TRACKING_USERNAME/PASSWORD.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login[1])
    from mlflow import MlflowClient

    client = MlflowClient(base)
    run = client.create_run(client.create_experiment("omni-auth"))
    (tmp_path / "weights.bin").write_bytes(b"w" * 1024)
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"), "model")
    from minio import Minio

    s3 = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    keys = [o.object_name for o in s3.list_objects("omni-mlflow", recursive=True)]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/model/weights.bin") for k in keys), keys
