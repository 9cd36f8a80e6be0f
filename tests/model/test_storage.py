"""The storage layer against the local filesystem and a real S3 server (SeaweedFS, started once for
this module on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest
import requests
import urllib3
from minio.error import S3Error, ServerError

from model.storage import (
    LocalStore,
    S3Store,
    StorageConfig,
    StorageError,
    is_transient,
    open_store,
    with_retries,
)
from tests.s3_server import S3Server, free_ports, s3_server_fixture

s3_server = s3_server_fixture()


def _bucket() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same behaviours, checked on both stores. S3 gets a fresh bucket + prefix per test."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3_server")
    return S3Store(_bucket(), "run/1", server.config())


def _s3_error(code: str, status: int) -> S3Error:
    return S3Error(urllib3.HTTPResponse(status=status), code, code, "/b/k", None, None)


# --------------------------------------------------------------------------- retry helper (no server)


class Flaky:
    """Raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: Exception):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.parametrize("error", [
    urllib3.exceptions.NewConnectionError(None, "connection refused"),
    ConnectionResetError("reset by peer"),
    ServerError("bad gateway", 502),
    _s3_error("SlowDown", 503),
    _s3_error("InternalError", 500),
], ids=["connect", "reset", "5xx", "slowdown", "internal"])
def test_retry_retries_transient_errors_with_exponential_backoff(error):
    sleeps: list[float] = []
    fn = Flaky(error, error, error)
    assert with_retries(fn, max_attempts=4, backoff_s=0.1, max_backoff_s=0.3, sleep=sleeps.append) == "ok"
    assert fn.calls == 4
    assert sleeps == [0.1, 0.2, 0.3]  # doubled, then capped


@pytest.mark.parametrize("error", [
    _s3_error("AccessDenied", 403),
    _s3_error("SignatureDoesNotMatch", 403),
    _s3_error("InvalidAccessKeyId", 403),
    _s3_error("NoSuchKey", 404),
    ValueError("a bug, not the network"),
], ids=["denied", "signature", "access-key", "missing", "bug"])
def test_retry_does_not_retry_auth_or_client_errors(error):
    sleeps: list[float] = []
    fn = Flaky(error)
    with pytest.raises(type(error)):
        with_retries(fn, max_attempts=5, sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []
    assert not is_transient(error)


def test_retry_gives_up_after_max_attempts_with_the_last_error():
    fn = Flaky(*(ConnectionRefusedError(f"try {i}") for i in range(5)))
    with pytest.raises(ConnectionRefusedError, match="try 2"):
        with_retries(fn, max_attempts=3, sleep=lambda s: None)
    assert fn.calls == 3


# --------------------------------------------------------------------------- config and URIs (no server)


def test_from_env_reads_the_mlflow_boto_variables():
    cfg = StorageConfig.from_env({"S3_ENDPOINT_URL": "http://minio.kubeflow:9000", "AWS_ACCESS_KEY_ID": "ak",
                                  "AWS_SECRET_ACCESS_KEY": "sk", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (cfg.endpoint, cfg.secure, cfg.access_key, cfg.secret_key, cfg.region) == (
        "minio.kubeflow:9000", False, "ak", "sk", "eu-west-1")
    assert StorageConfig.from_env({"S3_ENDPOINT_URL": "https://s3.example.com", "AWS_ACCESS_KEY_ID": "a",
                                   "AWS_SECRET_ACCESS_KEY": "s"}).secure
    assert "sk" not in repr(cfg)  # the secret stays out of logs


def test_from_env_names_the_missing_variable():
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY") as e:
        StorageConfig.from_env({"S3_ENDPOINT_URL": "http://h:9000", "AWS_ACCESS_KEY_ID": "ak"})
    assert "S3_ENDPOINT_URL" not in str(e.value)
    with pytest.raises(StorageError, match="S3_ENDPOINT_URL"):
        StorageConfig.from_env({})


def test_config_rejects_unknown_fields_and_urls_as_endpoint():
    with pytest.raises(ValueError, match="extra"):
        StorageConfig(endpoint="h:1", access_key="a", secret_key="s", bucket="b")
    with pytest.raises(ValueError, match="host:port"):
        StorageConfig(endpoint="http://h:1", access_key="a", secret_key="s")


def test_open_store_dispatches_on_the_uri(tmp_path):
    cfg = StorageConfig(endpoint="127.0.0.1:1", access_key="a", secret_key="s", secure=False)
    s3 = open_store("s3://bucket/some/prefix/", cfg)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri("x/y.bin") == "s3://bucket/some/prefix/x/y.bin"
    assert open_store("s3://bucket", cfg).uri("k") == "s3://bucket/k"
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        local = open_store(uri)
        assert isinstance(local, LocalStore) and local.root == tmp_path
    with pytest.raises(ValueError, match="scheme"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3:///x", cfg)


# --------------------------------------------------------------------------- both stores


def test_bytes_round_trip_and_overwrite(store):
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"\x00hello\xff")
    assert store.exists("a/b.bin")
    assert store.read_bytes("a/b.bin") == b"\x00hello\xff"
    store.write_bytes("a/b.bin", b"")
    assert store.read_bytes("a/b.bin") == b""


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    store.upload_file("files/src.bin", src)
    out = store.download_file("files/src.bin", tmp_path / "deep" / "er" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()


def test_list_is_recursive_sorted_and_filtered_by_prefix(store):
    for key in ("b/4", "a/2", "ab/3", "a/1", "a/sub/5"):
        store.write_bytes(key, key.encode())
    assert store.list() == ["a/1", "a/2", "a/sub/5", "ab/3", "b/4"]
    assert store.list("a/") == ["a/1", "a/2", "a/sub/5"]
    assert store.list("a") == ["a/1", "a/2", "a/sub/5", "ab/3"]  # a string prefix, as in S3
    assert store.list("zzz") == []


def test_delete_removes_only_the_named_keys_and_ignores_missing_ones(store):
    for key in ("a/1", "a/2", "b/3"):
        store.write_bytes(key, b"x")
    store.delete(["a/1", "b/3", "never/written"])
    assert store.list() == ["a/2"]
    store.delete([])


def test_dir_round_trip(store, tmp_path):
    src = tmp_path / "ckpt"
    files = {"config.json": b"{}", "weights/model.safetensors": os.urandom(50_000), "weights/.hidden": b"h"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    assert store.upload_dir(src, "ckpt") == sorted(f"ckpt/{r}" for r in files)
    store.write_bytes("ckpt2/other", b"not part of ckpt/")
    dst = tmp_path / "restored"
    store.download_dir("ckpt", dst)
    got = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == files


def test_missing_key_is_file_not_found_naming_the_uri(store, tmp_path):
    store.write_bytes("present", b"x")  # the bucket exists; only the key is missing
    for call in (lambda: store.read_bytes("no/such.bin"), lambda: store.download_file("no/such.bin", tmp_path / "x")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert store.uri("no/such.bin") in str(e.value)
    with pytest.raises(FileNotFoundError, match="no objects under prefix"):
        store.download_dir("empty", tmp_path / "d")
    assert not (tmp_path / "x").exists()


def test_keys_cannot_escape_the_store(store):
    for bad in ("../outside", "/abs", "a//b", "", "a/./b"):
        with pytest.raises(ValueError, match="invalid storage key"):
            store.write_bytes(bad, b"x")


def test_uri_opens_the_same_objects(store, s3_cfg_if_needed):
    store.write_bytes("shards/0.bin", b"shard")
    sub = open_store(store.uri("shards"), s3_cfg_if_needed(store))
    assert sub.read_bytes("0.bin") == b"shard"


@pytest.fixture
def s3_cfg_if_needed():
    return lambda store: store.cfg if isinstance(store, S3Store) else None


# --------------------------------------------------------------------------- S3 only


def test_multipart_upload_is_byte_exact(s3_server, tmp_path):
    store = S3Store(_bucket(), "big", s3_server.config(part_size=5 * 1024 * 1024))
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1000 * 1000))  # > part_size: three parts
    store.upload_file("big.bin", src)
    etag = store.client.stat_object(store.bucket, "big/big.bin").etag
    assert etag.endswith("-3"), f"expected a 3-part multipart ETag, got {etag}"
    out = store.download_file("big.bin", tmp_path / "back.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_bucket_is_created_on_first_write(s3_server):
    store = S3Store(_bucket(), "", s3_server.config())
    assert not store.client.bucket_exists(store.bucket)
    assert store.list() == [] and not store.exists("k")  # reading a missing bucket is just "nothing there"
    store.write_bytes("k", b"v")
    assert store.client.bucket_exists(store.bucket)
    store.ensure_bucket()  # idempotent, also for a second store on the same bucket
    S3Store(store.bucket, "", s3_server.config()).ensure_bucket()


@pytest.mark.parametrize("which", ["secret", "access"])
def test_wrong_credentials_give_a_clear_error_without_retrying(s3_server, which):
    good = S3Store(_bucket(), "", s3_server.config())
    good.write_bytes("k", b"v")
    wrong = {"secret_key": "not-the-secret"} if which == "secret" else {"access_key": "nobody"}
    bad = S3Store(good.bucket, "", s3_server.config(max_attempts=5, backoff_s=1.0, **wrong))
    expected = (f"access denied for bucket {good.bucket} at endpoint {s3_server.endpoint}: "
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    start = time.monotonic()
    for call in (lambda: bad.read_bytes("k"), lambda: bad.write_bytes("k2", b"x"), bad.list):
        with pytest.raises(StorageError, match=expected) as e:
            call()
        assert e.value.__cause__ is None and "Traceback" not in str(e.value)
    assert time.monotonic() - start < 1.0  # one backoff step would already take 1 s


def test_unreachable_endpoint_fails_after_retries_naming_it(s3_server):
    (port,) = free_ports(1)  # nothing listens there
    cfg = s3_server.config(endpoint=f"127.0.0.1:{port}", max_attempts=3, backoff_s=0.01)
    with pytest.raises(StorageError, match=f"S3 endpoint 127.0.0.1:{port} unreachable after 3 attempts"):
        S3Store(_bucket(), "", cfg).read_bytes("k")


def test_presigned_get_is_fetchable_without_credentials(s3_server):
    store = S3Store(_bucket(), "media", s3_server.config())
    store.write_bytes("img.png", b"\x89PNG fake")
    url = store.presigned_get("img.png", expires=60)
    assert url.startswith(f"http://{s3_server.endpoint}/")
    with requests.Session() as http:
        http.trust_env = False  # never through a proxy from the environment: traffic stays on 127.0.0.1
        resp = http.get(url, timeout=10)
        assert resp.status_code == 200 and resp.content == b"\x89PNG fake"
        assert http.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=10).status_code == 403


def test_open_store_from_environment(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = _bucket()
    store = open_store(f"s3://{bucket}/from-env")
    store.write_bytes("x", b"y")
    assert isinstance(store, S3Store) and store.cfg.endpoint == s3_server.endpoint
    assert S3Store(bucket, "", s3_server.config()).list() == ["from-env/x"]


def test_local_store_writes_atomically(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("a/b", b"1")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]  # no temp file left behind
    assert isinstance(open_store(str(tmp_path)).uri("a/b"), str) and Path(store.uri("a/b")).read_bytes() == b"1"
