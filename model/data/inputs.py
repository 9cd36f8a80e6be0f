"""Where records come from: JSONL files, folders and s3:// prefixes of them, and each record's media.

Media paths in a record resolve against its JSONL's folder, in the same store; s3:// URIs and
absolute paths are taken as they are.
"""

from __future__ import annotations

import codecs
import json
import os
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from model.config import DataConfig
from model.data.quarantine import Rejected
from model.storage import ObjectRefused, StorageConfig, StorageError, Store, open_store


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
            files += [InputFile(printable(str(p)), p.read_bytes, str(p.parent)) for p in paths]
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {', '.join(map(str, inputs))}")
    return files


def printable(text: str) -> str:
    """`text` as valid UTF-8: a file name that is not (Linux names are bytes; Python keeps the odd
    ones as lone surrogates) shows its odd bytes escaped in what prep writes, e.g. '\\udce9'."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_s3_settings(files: list[InputFile], out: str) -> None:
    """Refuse to start, before any work, a run that will need S3 (an s3:// output, or media under
    s3://) when the S3 settings are missing or malformed, rather than stop or quarantine every
    such record halfway. Local inputs are scanned only in that case, and only lines naming s3:."""
    try:
        StorageConfig.from_env()
        return
    except StorageError as err:
        problem = str(err)
    if out.startswith("s3://"):
        raise StorageError(f"the output {out} is on S3: {problem}")
    for f in files:
        if where := _s3_media_line(f):
            raise StorageError(f"{f.uri}:{where[0]} uses S3 media ({where[1]!r}): {problem}; or use local paths")


def _s3_media_line(f: InputFile) -> tuple[int, str] | None:
    """(line, uri) of the first record with an s3:// media item, if any (inputs under s3:// never get
    here: listing them needed the settings already)."""
    for line_no, raw in enumerate(f.read().removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
        if b"s3:" not in raw:
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            continue
        for kind in ("images", "videos", "audios"):
            items = obj.get(kind) if isinstance(obj, dict) else None
            for uri in items if isinstance(items, list) else []:
                if isinstance(uri, str) and uri.startswith("s3://"):
                    return line_no, uri
    return None


def fetch_media(uri: str, base: str, data: DataConfig) -> bytes:
    """A record's media item: an s3:// URI, an absolute path, or a path relative to `base`. Paths are
    data, not commands: only regular files are read (not devices, pipes, folders, /proc or /sys), at
    most `data.max_media_bytes`, and with `data.media_roots` set only inside those folders. Anything
    a record's path can get wrong is `Rejected`; only the store itself failing (StorageError) is not."""
    try:
        if "\x00" in uri:
            raise Rejected("unreadable media", f"{uri!r} holds a NUL character")
        if uri.startswith("s3://") or (base.startswith("s3://") and not os.path.isabs(uri)):
            return _fetch_s3(uri, base, data)
        return _read_regular(uri, base, data)
    except FileNotFoundError as err:
        raise Rejected("missing media", f"{uri!r} not found (looked for {err.filename or err})") from None
    except (ObjectRefused, ValueError) as err:  # a malformed bucket or key name, refused before or by the server
        raise Rejected("unreadable media", f"{uri!r}: {err}") from None


def _fetch_s3(uri: str, base: str, data: DataConfig) -> bytes:
    bucket, key = _split_s3(uri) if uri.startswith("s3://") else _split_s3(base)
    key = posixpath.normpath(key if uri.startswith("s3://") else posixpath.join(key, uri))
    if key.startswith(".."):
        raise Rejected("missing media", f"{uri!r} points outside bucket {bucket!r}")
    store = _bucket(bucket)
    if (size := store.size(key)) > data.max_media_bytes:
        raise Rejected("media too large", f"{uri!r} is {size} bytes, over data.max_media_bytes={data.max_media_bytes}")
    return store.read_bytes(key)


@lru_cache(maxsize=1)
def _pseudo_devices() -> frozenset[int]:
    """The devices of /proc and /sys: their "files" are kernel interfaces (/proc/self/mem, /sys/...)."""
    return frozenset(os.stat(p).st_dev for p in ("/proc", "/sys") if os.path.isdir(p))


def _read_regular(uri: str, base: str, data: DataConfig) -> bytes:
    path = Path(uri) if os.path.isabs(uri) else Path(base) / uri
    try:
        real = path.resolve(strict=True)  # symlinks followed: the roots apply to where the bytes are
        _check_roots(uri, real, base, data.media_roots)
        st = os.stat(real)  # before opening: opening a device or a FIFO may block or have side effects
        _check_regular(uri, st, data)
        with open(real, "rb") as f:
            st = os.fstat(f.fileno())  # the file opened, in case the path was swapped meanwhile
            _check_regular(uri, st, data)
            blob = f.read(st.st_size + 1)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as err:  # too long, a loop of links, no permission, I/O error ...
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise Rejected("unreadable media", f"{uri!r} cannot be read ({reason})") from None
    if len(blob) != st.st_size:
        raise Rejected("unreadable media", f"{uri!r} changed size while it was read")
    return blob


def _check_regular(uri: str, st: os.stat_result, data: DataConfig) -> None:
    if not stat.S_ISREG(st.st_mode):
        what = "folder" if stat.S_ISDIR(st.st_mode) else "device, pipe or socket"
        raise Rejected("unreadable media", f"{uri!r} is a {what}, not a regular file")
    if st.st_dev in _pseudo_devices():
        raise Rejected("unreadable media", f"{uri!r} is a kernel interface (/proc or /sys), not a media file")
    if st.st_size > data.max_media_bytes:
        raise Rejected("media too large",
                       f"{uri!r} is {st.st_size} bytes, over data.max_media_bytes={data.max_media_bytes}")


def _check_roots(uri: str, real: Path, base: str, roots: list[str]) -> None:
    """With data.media_roots set, the file must lie under one of them, or (a relative path) under
    its JSONL file's folder: a corpus cannot copy arbitrary files of the machine into a data set."""
    if not roots:
        return
    allowed = [Path(r).resolve() for r in roots] + ([Path(base).resolve()] if not os.path.isabs(uri) else [])
    if not any(real.is_relative_to(root) for root in allowed):
        raise Rejected("media outside roots", f"{uri!r} resolves to {str(real)!r}, outside data.media_roots={roots}")
