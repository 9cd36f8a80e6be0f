"""Lifecycle steps: the MLflow parent run, registration, the promotion gate, the champion's
InferenceService. No torch here: these steps run on the CPU pool and start fast."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from components.cluster import endpoint
from components.cluster.kube import Kube, connect
from components.config import OmniConfig
from components.registry import champion, gate, lineage, tracking
from serving.manifests import validate_custom_resource, write_manifest


def mlflow_uri(cfg: OmniConfig) -> str:
    return tracking.tracking_uri(cfg.tracking.uri, cfg.workdir())


def start_tracking(cfg: OmniConfig, pipeline_run: str) -> str:
    """The parent MLflow run every stage nests under. Returns its id."""
    return tracking.start_pipeline_run(
        mlflow_uri(cfg), cfg.tracking.experiment, cfg.run.name,
        tags={"pipeline_run": pipeline_run, "config_sha256": cfg.sha256(), "git_sha": tracking.git_sha()},
    )


def register(cfg: OmniConfig, model_dir: Path, metrics: dict, manifest_sha256: str,
             parent_run_id: str, pipeline_run: str, outputs: Mapping[str, tuple[Path, str]] | None = None) -> str:
    """A new registered version (alias `challenger`) with lineage tags and its eval results: the
    evaluate step's summary (per-benchmark scores, their standard errors and data hashes, which the
    gate reads) or a plain {metric: value} mapping. `outputs` (name -> (folder, artifact URI)) are the
    pipeline's step outputs: their records become child runs of the pipeline run, cached or not, and
    each one's artifact and run become the version's lineage tags. A re-run of the step (after a
    registry outage) completes the version its earlier attempt created."""
    uri = mlflow_uri(cfg)
    values, data_tags = gate.eval_record(metrics)
    with tracking.registry_outage(uri, f"registering {cfg.tracking.registered_model}"):
        lineage_tags = lineage.log_records(uri, cfg.tracking.experiment, parent_run_id, pipeline_run, outputs or {})
    with tracking.registry_outage(uri, f"registering {cfg.tracking.registered_model}"), \
            tracking.stage_run(uri, cfg.tracking.experiment, parent_run_id, "register") as run:
        version = tracking.register_model_version(
            uri, cfg.tracking.registered_model, model_dir, run.run_id,
            tags={"pipeline_run_id": pipeline_run, "data_manifest_sha256": manifest_sha256,
                  "config_sha256": cfg.sha256(), "git_sha": tracking.git_sha(), **data_tags, **lineage_tags},
            metrics=values, registration_key=pipeline_run,  # one registration per pipeline run: a re-run resumes it
        )
    return version


def judge(cfg: OmniConfig, version: str) -> dict:
    """The gate: compare `version` with `@champion` under the promotion rules, record the verdict
    on the version (tags), move nothing."""
    with tracking.registry_outage(mlflow_uri(cfg), f"judging version {version}"):
        decision = champion.judge(mlflow_uri(cfg), cfg.tracking.registered_model, version, cfg.promotion)
    return decision.model_dump()


def promote(cfg: OmniConfig, version: str, out_dir: Path, kube: Kube | None = None) -> dict:
    """Serve `version` and make it the champion; only called after the gate passed. The
    InferenceService is always written to `out_dir`; with cluster.target=kubernetes it is also
    rolled out (canary, then full traffic) before `champion` moves, so a failed rollout leaves
    the alias where it was."""
    with tracking.registry_outage(mlflow_uri(cfg), f"reading version {version} to promote it"):
        isvc = champion_inference_service(cfg, version)
    validate_custom_resource(isvc)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(isvc, out_dir / "inferenceservice.yaml")
    if cfg.cluster.target == "kubernetes":
        endpoint.rollout(cfg, isvc, kube or connect())
    # Re-runnable: crown moves previous-champion, then champion, each to where a finished promote puts it.
    with tracking.registry_outage(mlflow_uri(cfg), f"promoting version {version} to {tracking.CHAMPION}"):
        champion.crown(mlflow_uri(cfg), cfg.tracking.registered_model, version)
    return isvc


def rollback(cfg: OmniConfig, out_dir: Path | None = None, kube: Kube | None = None) -> tuple[str, dict]:
    """Serve `previous-champion` again (full traffic at once), then move `champion` back to it.
    Same order as promote: a failed apply or rollout leaves both aliases where they were, so the
    registry keeps naming what the cluster serves. Returns the version that is champion now and
    its InferenceService."""
    uri, model = mlflow_uri(cfg), cfg.tracking.registered_model
    version = champion.rollback_target(uri, model)
    isvc = champion_inference_service(cfg, version)
    validate_custom_resource(isvc)
    if out_dir is not None:
        write_manifest(isvc, Path(out_dir) / "inferenceservice.yaml")
    if cfg.cluster.target == "kubernetes":
        endpoint.rollout(cfg, isvc, kube or connect(), canary=False)
    moved = champion.rollback(uri, model)
    if moved != version:  # someone promoted in between: the cluster serves `version`, say so
        raise RuntimeError(f"{tracking.PREVIOUS_CHAMPION!r} moved from version {version} to {moved} during the "
                           f"rollback; the cluster serves version {version}: run `omni rollback` again or promote "
                           "the version that should serve")
    return version, isvc


def finish_tracking(cfg: OmniConfig, parent_run_id: str) -> None:
    tracking.end_run(mlflow_uri(cfg), parent_run_id)


def champion_inference_service(cfg: OmniConfig, version: str) -> dict:
    """The InferenceService for a registered version, pointing at the version's artifact location
    (s3:// with an MLflow server on object storage; file:// in embedded mode)."""
    uri = tracking.client(mlflow_uri(cfg)).get_model_version_download_uri(cfg.tracking.registered_model, version)
    return endpoint.champion_isvc(cfg, endpoint.storage_uri(cfg, uri), version)
