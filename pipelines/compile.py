"""Compile the DAG to the KFP YAML that clusters run (`kfp run submit -e EXP -f FILE key=value`)."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from components.config import OmniConfig
from pipelines.dag import build_pipeline


def compile_pipeline(cfg: OmniConfig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg), package_path=str(out))
    return out
