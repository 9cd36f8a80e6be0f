"""Where records come from: JSONL files, folders and s3:// prefixes of them, and each record's media.

Media paths in a record resolve against its JSONL's folder, in the same store; s3:// URIs and
absolute paths are taken as they are.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from model.data.quarantine import Rejected
from model.storage import Store, open_store


@dataclass(frozen=True)
class InputFile:
    uri: str  # how quarantine lines name it
    read: Callable[[], bytes]
    base: str  # the folder (local path or s3://bucket/dir) its relative media paths resolve against


def _bucket(bucket: str) -> Store:
    """A client per bucket, reused across records (the environment gives endpoint and keys)."""
    return _open_bucket(bucket, os.environ.get("S3_ENDPOINT_URL", ""), os.environ.get("AWS_ACCESS_KEY_ID", ""))


@lru_cache(maxsize=16)
def _open_bucket(bucket: str, endpoint: str, access_key: str) -> Store:  # the env values key the cache
    return open_store(f"s3://{bucket}")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def input_files(inputs: list[str | Path]) -> list[InputFile]:
    """JSONL files, or every *.jsonl directly inside a folder / under an s3:// prefix, sorted."""
    files: list[InputFile] = []
    for raw in map(str, inputs):
        if raw.startswith("s3://"):
            bucket, key = _split_s3(raw)
            keys = [key] if key.endswith(".jsonl") else [
                k for k in _bucket(bucket).list(key.rstrip("/") + "/" if key.strip("/") else "")
                if k.endswith(".jsonl") and posixpath.dirname(k) == key.strip("/")]
            files += [InputFile(f"s3://{bucket}/{k}", (lambda b=bucket, k=k: _bucket(b).read_bytes(k)),
                                f"s3://{bucket}/{posixpath.dirname(k)}") for k in keys]
        else:
            path = Path(raw)
            if not path.exists():
                raise FileNotFoundError(f"input {raw} does not exist")
            paths = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
            files += [InputFile(str(p), p.read_bytes, str(p.parent)) for p in paths]
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {', '.join(map(str, inputs))}")
    return files


def fetch_media(uri: str, base: str) -> bytes:
    """A record's media item: an s3:// URI, an absolute path, or a path relative to `base`."""
    try:
        if uri.startswith("s3://") or (base.startswith("s3://") and not os.path.isabs(uri)):
            bucket, key = _split_s3(uri) if uri.startswith("s3://") else _split_s3(base)
            key = posixpath.normpath(key if uri.startswith("s3://") else posixpath.join(key, uri))
            if key.startswith(".."):
                raise Rejected("missing media", f"{uri!r} points outside bucket {bucket!r}")
            return _bucket(bucket).read_bytes(key)
        path = Path(uri) if os.path.isabs(uri) else Path(base) / uri
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return path.read_bytes()
    except FileNotFoundError as err:
        raise Rejected("missing media", f"{uri!r} not found (looked for {err.filename or err})") from None
