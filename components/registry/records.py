"""What a cached step has to say to MLflow, kept in its own output until an uncached step logs it.

KFP reuses a cached task's outputs without running it, so a step that logged to MLflow itself would
either need the run's parent id as an input (a new value every run: the cache never hits) or leave a
reused stage out of the run. Instead each step writes `record.json` into its output: its params,
metrics, metric histories and the files worth keeping; `register`, which runs every time, logs them
(components.registry.lineage). No MLflow here: every training step writes a record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RECORD_FILE = "record.json"


def write_record(folder: Path, name: str, params: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, float] | None = None, history: Mapping[str, Sequence[float]] | None = None,
                 files: Sequence[str] = (), tags: Mapping[str, Any] | None = None) -> Path:
    """`files`: names relative to `folder` to attach as the run's artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "params": dict(params or {}), "metrics": dict(metrics or {}),
              "history": {k: list(v) for k, v in (history or {}).items()}, "files": list(files),
              "tags": dict(tags or {})}
    path = folder / RECORD_FILE
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None
