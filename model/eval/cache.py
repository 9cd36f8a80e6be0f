"""Per-item predictions kept while a benchmark runs, so a killed evaluation continues where it stopped
and ranks of a sharded one can be merged.

Layout under the cache store (a folder or s3:// prefix):

    <key>/rank-<r>/part-<n>.jsonl   one object per answered item: {"id", "prediction"} or {"id", "failed"}

`key` hashes what the answers depend on: the checkpoint's bytes, the benchmark's settings and its
data. A different model, prompt or data set gets a different key, so stale answers are never reused.
Each batch is one part written whole (atomically on a local disk; objects are whole on S3), so a
kill loses at most the batch in flight. The set of done ids is read from every rank's parts, so a
resume may use a different number of ranks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from model.storage import Store


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """sha256 over every file of a checkpoint folder (names and bytes)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class PredictionCache:
    def __init__(self, store: Store, key: str, rank: int = 0):
        self.store, self.key, self.rank = store, key, rank
        self._parts = len(self.store.list(f"{key}/rank-{rank:05d}/"))

    def done(self) -> dict[str, dict]:
        """Every cached answer, from all ranks, by item id."""
        out: dict[str, dict] = {}
        for name in self.store.list(f"{self.key}/"):
            if name.endswith(".jsonl"):
                for line in self.store.read_bytes(name).decode().splitlines():
                    if line.strip():
                        row = json.loads(line)
                        out[row["id"]] = row
        return out

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        self.store.write_bytes(f"{self.key}/rank-{self.rank:05d}/part-{self._parts:06d}.jsonl", data)
        self._parts += 1
