"""Run the whole DAG on this machine with `kfp.local` (embedded mode: the current interpreter,
MLflow on a sqlite file, artifacts under run.workdir)."""

from __future__ import annotations

import json
from pathlib import Path

from kfp import local

from components.config import OmniConfig
from pipelines.dag import build_pipeline


def resolve_local(cfg: OmniConfig) -> OmniConfig:
    """Pin relative paths to absolute ones so every step process sees the same workdir."""
    resolved = cfg.model_copy(deep=True)
    resolved.run.workdir = str(cfg.workdir())
    return resolved


def run_local(cfg: OmniConfig, data_uri: str | Path) -> dict[str, float]:
    """Run the pipeline to the end; returns the trained model's overall eval metrics."""
    cfg = resolve_local(cfg)
    root = Path(cfg.run.workdir) / "pipeline_root"
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline(cfg)
    task = pipeline(data_uri=str(Path(data_uri).resolve()), config_json=cfg.to_json())
    return json.loads(task.output)
