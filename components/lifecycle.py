"""Lifecycle steps: the MLflow parent run, registration, the promotion gate, the champion's
InferenceService. No torch here: these steps run on the CPU pool and start fast."""

from __future__ import annotations

from pathlib import Path

from components import gate, tracking
from components.config import OmniConfig
from serving.manifests import inference_service, validate_custom_resource, write_manifest


def mlflow_uri(cfg: OmniConfig) -> str:
    return tracking.tracking_uri(cfg.tracking.uri, cfg.workdir())


def start_tracking(cfg: OmniConfig, pipeline_run: str) -> str:
    """The parent MLflow run every stage nests under. Returns its id."""
    return tracking.start_pipeline_run(
        mlflow_uri(cfg), cfg.tracking.experiment, cfg.run.name,
        tags={"pipeline_run": pipeline_run, "config_sha256": cfg.sha256(), "git_sha": tracking.git_sha()},
    )


def register(cfg: OmniConfig, model_dir: Path, metrics: dict[str, float], manifest_sha256: str,
             parent_run_id: str, pipeline_run: str) -> str:
    """A new registered version (alias `challenger`) with lineage tags and its eval metrics."""
    uri = mlflow_uri(cfg)
    with tracking.stage_run(uri, cfg.tracking.experiment, parent_run_id, "register") as run:
        version = tracking.register_model_version(
            uri, cfg.tracking.registered_model, model_dir, run.run_id,
            tags={"pipeline_run_id": pipeline_run, "data_manifest_sha256": manifest_sha256,
                  "config_sha256": cfg.sha256(), "git_sha": tracking.git_sha()},
            metrics=metrics,
        )
    return version


def judge(cfg: OmniConfig, version: str) -> dict:
    """The gate: compare `version` with `@champion` under the promotion rules, record the verdict
    on the version (tags), move nothing."""
    decision = gate.judge(mlflow_uri(cfg), cfg.tracking.registered_model, version, cfg.promotion)
    return decision.model_dump()


def promote(cfg: OmniConfig, version: str, out_dir: Path) -> dict:
    """Make `version` the champion and write the InferenceService that serves it (applied to the
    cluster in cluster mode). Only called after the gate passed."""
    isvc = champion_inference_service(cfg, version)
    validate_custom_resource(isvc)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(isvc, out_dir / "inferenceservice.yaml")
    gate.crown(mlflow_uri(cfg), cfg.tracking.registered_model, version)
    return isvc


def finish_tracking(cfg: OmniConfig, parent_run_id: str) -> None:
    tracking.end_run(mlflow_uri(cfg), parent_run_id)


def champion_inference_service(cfg: OmniConfig, version: str) -> dict:
    """The InferenceService for a registered version, pointing at the version's artifact location
    (an s3:// URI with an MLflow server on object storage; a file:// URI in embedded mode)."""
    storage_uri = tracking.client(mlflow_uri(cfg)).get_model_version_download_uri(cfg.tracking.registered_model, version)
    return inference_service(
        name=cfg.serving.model_name, namespace=cfg.cluster.namespace, storage_uri=storage_uri,
        labels={"omni-platform/model-version": str(version)},
    )
