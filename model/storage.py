"""Object storage for data, shards and checkpoints: one small `Store` interface over the local
filesystem and S3 (MinIO in the cluster, any S3-compatible server in tests) via the `minio` client.

    store = open_store("s3://omni-data/prepared")      # or "/data/prepared", "file:///data/prepared"
    store.write_bytes("manifest.json", b"{}")
    store.upload_dir("out/shards", "shards")
    store.list("shards/")                                # keys relative to the store root, sorted

Keys are "/"-separated and relative to the store's root (the path, or bucket + prefix).
Errors are translated into three kinds a caller can act on: `FileNotFoundError` (missing key),
`StorageError` (bad credentials, endpoint down after retries, anything else the server refused)
and `ValueError` (a malformed key or URI).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import Field, field_validator

from model.config import Strict

T = TypeVar("T")

MiB = 1024 * 1024

# S3 error codes that mean "try again later" even when the HTTP status is not 5xx.
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "ResourceNotFound"}


class StorageError(Exception):
    """A storage operation failed for a reason other than a missing key."""


class ObjectRefused(StorageError):
    """The server refused a request about one object (a 4xx other than auth or missing: a key too
    long, an invalid argument): the key's problem, not the store's."""


class StorageConfig(Strict):
    """How to reach an S3 endpoint. `secret_key` is kept out of repr so configs can be logged."""

    endpoint: str  # host:port, no scheme: `secure` says http or https
    access_key: str
    secret_key: str = Field(repr=False)
    secure: bool = True
    region: str | None = None
    # minio uploads a file in parts of this size (multipart) once it is larger; 5 MiB is S3's minimum.
    part_size: int = Field(default=64 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=0.2, ge=0)  # first retry waits this long, then doubles
    max_backoff_s: float = Field(default=10.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)  # per HTTP connect/read

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if not v or "://" in v or "/" in v:
            raise ValueError(f"endpoint must be host:port without scheme or path, got {v!r}")
        return v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageConfig:
        """From the variables MLflow and boto already use: S3_ENDPOINT_URL (`http://host:port`;
        without a scheme https is assumed), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
        optionally AWS_DEFAULT_REGION / AWS_REGION."""
        env = os.environ if env is None else env
        missing = [k for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
        if missing:
            raise StorageError(f"S3 storage needs the environment variable(s) {', '.join(missing)} to be set")
        url = env["S3_ENDPOINT_URL"].rstrip("/")
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise StorageError(f"S3_ENDPOINT_URL must look like http(s)://host:port, got {url!r}")
        return cls(
            endpoint=parts.netloc,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            secure=parts.scheme == "https",
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
        )


# --------------------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the server hiccupped. Never 4xx (auth, missing key, bad request):
    repeating those only delays a certain failure."""
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES or (exc.response is not None and exc.response.status >= 500)
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):  # non-XML error body, e.g. from a proxy in front
        status = exc.__reduce__()[1][0]  # minio keeps the status only in a private field
        return status >= 500 or status == 429
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def with_retries(
    fn: Callable[[], T],
    max_attempts: int = 5,
    backoff_s: float = 0.2,
    max_backoff_s: float = 10.0,
    retry_if: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn` until it succeeds, retrying errors `retry_if` accepts with exponential backoff
    (backoff_s, 2*backoff_s, ... capped at max_backoff_s). The last error is re-raised as is."""
    for attempt in range(1, max_attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == max_attempts or not retry_if(exc):
                raise
            sleep(min(backoff_s * 2 ** (attempt - 1), max_backoff_s))
    raise AssertionError("unreachable")  # max_attempts >= 1 always returns or raises above


# --------------------------------------------------------------------------- stores


def _check_key(key: str) -> str:
    """Keys are relative "/"-paths; refusing "..", "." and empty parts keeps a LocalStore inside its
    root and makes both stores agree on what a key is."""
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: expected a relative path like 'a/b.bin'")
    return key


def _dir_prefix(prefix: str) -> str:
    """'ckpt' and 'ckpt/' both mean the folder ckpt/ (so 'ckpt2/x' is not part of it)."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _local_files(local_dir: Path) -> list[Path]:
    return sorted(p for p in Path(local_dir).rglob("*") if p.is_file())


class Store(Protocol):
    def uri(self, key: str = "") -> str: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, key: str, path: str | Path) -> None: ...
    def download_file(self, key: str, path: str | Path) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def upload_dir(self, local_dir: str | Path, prefix: str = "") -> list[str]: ...
    def download_dir(self, prefix: str, local_dir: str | Path) -> list[Path]: ...
    def delete(self, keys: Iterable[str]) -> None: ...
    # Last, so that `list[...]` in the annotations above still means the builtin for type checkers.
    def list(self, prefix: str = "") -> list[str]: ...


class _DirMixin:
    """upload_dir/download_dir in terms of the single-object operations, shared by both stores."""

    def upload_dir(self: Store, local_dir: str | Path, prefix: str = "") -> list[str]:
        """Upload every file under `local_dir` to `prefix/<relative path>`; returns the keys."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(local_dir))
        keys = []
        for path in _local_files(local_dir):
            key = _dir_prefix(prefix) + path.relative_to(local_dir).as_posix()
            self.upload_file(key, path)
            keys.append(key)
        return keys

    def download_dir(self: Store, prefix: str, local_dir: str | Path) -> list[Path]:
        """Download every key under the folder `prefix` into `local_dir`, keeping relative paths.
        An empty folder is an error: it is nearly always a mistyped prefix."""
        base = _dir_prefix(prefix)
        keys = self.list(base)
        if not keys:
            raise FileNotFoundError(errno.ENOENT, "no objects under prefix", self.uri(base))
        return [self.download_file(k, Path(local_dir) / k[len(base):]) for k in keys]


def _is_temp(key: str) -> bool:
    """Our own in-flight temp files (".name.XXXX.tmp") from concurrent writers are not objects yet."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp")


class LocalStore(_DirMixin):
    """A directory on the local filesystem (or a mounted volume). Writes go to a temp file that is
    renamed into place, so a reader never sees half a file."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def uri(self, key: str = "") -> str:
        # A plain path (not file://) so existing path-based loaders accept it as is.
        return str(self.root / key) if key else str(self.root)

    def _missing(self, key: str) -> FileNotFoundError:
        return FileNotFoundError(errno.ENOENT, "no such object", self.uri(key))

    def _atomic_write(self, dest: Path, fill: Callable[[Path], None]) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fill(Path(tmp))
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise self._missing(key)
        return path.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))

    def upload_file(self, key: str, path: str | Path) -> None:
        self._atomic_write(self._path(key), lambda tmp: shutil.copyfile(path, tmp))

    def download_file(self, key: str, path: str | Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise self._missing(key)
        self._atomic_write(Path(path), lambda tmp: shutil.copyfile(src, tmp))
        return Path(path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        if not self.exists(key):
            raise self._missing(key)
        return self._path(key).stat().st_size

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these objects; keys that do not exist are fine."""
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in _local_files(self.root))
        return sorted(k for k in keys if k.startswith(prefix) and not _is_temp(k))


class S3Store(_DirMixin):
    """`s3://bucket/prefix` through the `minio` client. The bucket is created on first write if missing."""

    def __init__(self, bucket: str, prefix: str, cfg: StorageConfig, client: Minio | None = None):
        self.bucket, self.prefix, self.cfg = bucket, prefix.strip("/"), cfg
        # Our own retry loop is the only one: minio's default urllib3 pool retries 5x internally,
        # which would multiply with ours and hide an unreachable endpoint for a long time.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s), retries=False, maxsize=10
        )
        self.client = client or Minio(
            cfg.endpoint, cfg.access_key, cfg.secret_key, secure=cfg.secure, region=cfg.region, http_client=http
        )
        self._bucket_ready = False

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)

    def uri(self, key: str = "") -> str:
        path = "/".join(p for p in (self.prefix, key) if p)
        return f"s3://{self.bucket}/{path}"

    def _call(self, fn: Callable[[], T], key: str = "") -> T:
        """Run one S3 operation with retries, translating minio's errors into ours."""
        c = self.cfg
        try:
            return with_retries(fn, c.max_attempts, c.backoff_s, c.max_backoff_s)
        except S3Error as e:
            status = e.response.status if e.response is not None else 0
            if e.code in _MISSING_CODES:
                raise FileNotFoundError(errno.ENOENT, f"no such object ({e.code})", self.uri(key)) from None
            if e.code in _AUTH_CODES or status in (401, 403):
                raise StorageError(
                    f"access denied for bucket {self.bucket} at endpoint {c.endpoint}: "
                    f"check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({e.code})"
                ) from None
            error = ObjectRefused if 400 <= status < 500 else StorageError
            raise error(f"S3 error on {self.uri(key)} at endpoint {c.endpoint}: {e.code}: {e.message}") from e
        except (ServerError, InvalidResponseError) as e:
            raise StorageError(f"S3 endpoint {c.endpoint} failed on {self.uri(key)}: {e}") from e
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
            raise StorageError(
                f"S3 endpoint {c.endpoint} unreachable after {c.max_attempts} attempts "
                f"({type(e).__name__}: {e})"
            ) from e

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (once per store; cheap afterwards)."""
        if self._bucket_ready:
            return

        def make() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as e:  # another writer created it between our check and our create
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self._call(make)
        self._bucket_ready = True

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            resp = self.client.get_object(self.bucket, self._name(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(get, key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.ensure_bucket()
        name = self._name(key)
        self._call(lambda: self.client.put_object(self.bucket, name, io.BytesIO(data), len(data)), key)

    def upload_file(self, key: str, path: str | Path) -> None:
        self.ensure_bucket()
        name = self._name(key)
        self._call(
            lambda: self.client.fput_object(self.bucket, name, str(path), part_size=self.cfg.part_size), key
        )

    def download_file(self, key: str, path: str | Path) -> Path:
        # fget_object writes "<path>.<etag>.part.minio" and renames it when complete.
        name = self._name(key)
        self._call(lambda: self.client.fget_object(self.bucket, name, str(path)), key)
        return Path(path)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._call(lambda: self.client.stat_object(self.bucket, name), key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        """Bytes of the object, from its metadata (nothing is downloaded)."""
        name = self._name(key)
        return self._call(lambda: self.client.stat_object(self.bucket, name), key).size

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these objects in batched DeleteObjects requests; missing keys and a missing bucket are fine."""
        names = [self._name(k) for k in keys]
        if not names:
            return

        def remove() -> list:  # remove_objects is lazy: the requests happen while it is consumed
            return list(self.client.remove_objects(self.bucket, [DeleteObject(n) for n in names]))

        try:
            errors = [e for e in self._call(remove) if e.code != "NoSuchKey"]
        except FileNotFoundError:  # no bucket: nothing to delete
            return
        if errors:
            raise StorageError(f"could not delete {len(errors)} object(s) under {self.uri()}, e.g. {errors[0].name!r}: "
                               f"{errors[0].code} ({errors[0].message}); the credentials need delete permission there")

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""

        def names() -> list[str]:
            objs = self.client.list_objects(self.bucket, prefix=base + prefix, recursive=True)
            return [o.object_name for o in objs if not o.is_dir]

        try:
            found = self._call(names, prefix)
        except FileNotFoundError:  # no bucket yet: nothing under any prefix
            return []
        return sorted(n[len(base):] for n in found)

    def presigned_get(self, key: str, expires: timedelta | float = timedelta(hours=1)) -> str:
        """A URL anyone can GET for `expires` (a timedelta or seconds) without credentials,
        e.g. to hand media to a client or a KServe predictor."""
        if not isinstance(expires, timedelta):
            expires = timedelta(seconds=expires)
        name = self._name(key)
        return self._call(lambda: self.client.presigned_get_object(self.bucket, name, expires=expires), key)


def open_store(uri: str, cfg: StorageConfig | None = None) -> Store:
    """`s3://bucket/prefix` -> S3Store (config from the environment unless given);
    `file:///path` or a plain path -> LocalStore."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"S3 URI without a bucket: {uri!r} (expected s3://bucket/prefix)")
        return S3Store(parts.netloc, parts.path, cfg or StorageConfig.from_env())
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a remote host: {uri!r}")
        return LocalStore(parts.path)
    if parts.scheme and len(parts.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(f"unsupported storage URI scheme {parts.scheme!r} in {uri!r} (use a path, file:// or s3://)")
    return LocalStore(uri)
