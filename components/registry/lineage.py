"""Step records (components.registry.records) -> MLflow: `register`, which runs every time, logs each record
as a child run of the pipeline's run and tags the registered version with each stage's artifact and
run (its lineage). A reused output (its artifact URI names an earlier pipeline run) was logged by
that run's `register`: its run is found by the artifact URI and linked, not logged twice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from components.registry import tracking
from components.registry.records import read_record

RECORD_TAG = "omni.record"  # on a child run: which pipeline output's record it logs


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
        earlier = _run_of_artifact(uri, experiment, artifact_uri) if reused else None
        if earlier is not None:
            lineage |= _lineage(name, artifact_uri, earlier, True)
            continue
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


def _run_of_artifact(uri: str, experiment: str, artifact_uri: str) -> str | None:
    """The run that logged the output at `artifact_uri` (an earlier pipeline run's), if any."""
    experiment_id = tracking.ensure_experiment(uri, experiment)
    runs = tracking.client(uri).search_runs([experiment_id], f"tags.artifact_uri = '{artifact_uri}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _children(uri: str, experiment: str, parent_run_id: str) -> dict[str, str]:
    """Output name -> run id of the records already logged under `parent_run_id`."""
    experiment_id = tracking.ensure_experiment(uri, experiment)
    runs = tracking.client(uri).search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags[RECORD_TAG]: r.info.run_id for r in runs if RECORD_TAG in r.data.tags}
