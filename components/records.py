"""What a cached step has to say to MLflow, kept in its own output until an uncached step logs it.

KFP reuses a cached task's outputs without running it, so a step that logged to MLflow itself would
either need the run's parent id as an input (a new value every run: the cache never hits) or leave a
reused stage out of the run. Instead each step writes `record.json` into its output: its params,
metrics, metric histories and the files worth keeping. `register`, which runs every time, logs every
stage's record as a child run of the pipeline's run, marked `reused` when the artifact came from an
earlier run, and tags the registered version with each stage's artifact and run (its lineage).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from components import tracking

RECORD_FILE = "record.json"
RECORD_TAG = "omni.record"  # on a child run: which pipeline output's record it logs


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


def log_records(uri: str, experiment: str, parent_run_id: str, pipeline_run: str,
                outputs: Mapping[str, tuple[Path, str]]) -> dict[str, str]:
    """Log each output's record (`outputs`: name -> (local folder, artifact URI)) as a child run of
    `parent_run_id`; returns the lineage tags for the registered version."""
    lineage = {}
    logged = _children(uri, experiment, parent_run_id)  # a re-run (after an outage) logs nothing twice
    for name, (folder, artifact_uri) in outputs.items():
        record = read_record(folder)
        if record is None:
            continue
        if name in logged:
            lineage |= _lineage(name, artifact_uri, logged[name], pipeline_run not in artifact_uri)
            continue
        reused = pipeline_run not in artifact_uri  # KFP and kfp.local put a run's outputs under its name
        tags = {**record.get("tags", {}), "artifact_uri": artifact_uri, "reused": str(reused).lower()}
        with tracking.stage_run(uri, experiment, parent_run_id, record["name"], params=record["params"],
                                tags=tags) as run:
            run.log_metrics(record["metrics"])
            for key, values in record["history"].items():
                run.log_metric_history(key, values)
            for file in record["files"]:
                if (Path(folder) / file).is_file():
                    run.log_artifact(Path(folder) / file, record["name"])
            run.set_tags({RECORD_TAG: name})
        lineage |= _lineage(name, artifact_uri, run.run_id, reused)
    return lineage


def _lineage(name: str, artifact_uri: str, run_id: str, reused: bool) -> dict[str, str]:
    return {f"lineage.{name}.artifact": artifact_uri, f"lineage.{name}.run_id": run_id,
            f"lineage.{name}.reused": str(reused).lower()}


def _children(uri: str, experiment: str, parent_run_id: str) -> dict[str, str]:
    """Output name -> run id of the records already logged under `parent_run_id`."""
    experiment_id = tracking.ensure_experiment(uri, experiment)
    runs = tracking.client(uri).search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags[RECORD_TAG]: r.info.run_id for r in runs if RECORD_TAG in r.data.tags}
