"""The export step: the trained checkpoint as a Triton model repository (ONNX encoders checked
against torch, the LLM, the entry model, which refuses media as the endpoint does); returns the
export report."""

from __future__ import annotations

import json
from pathlib import Path

from model.export.triton import write_triton_repository
from model.media.limits import MediaLimits
from serving.config import ServingLimits


def export(model_dir: Path, out_dir: Path, limits: ServingLimits | None = None) -> dict:
    """The repository under `limits` (default: the endpoint's default `serving.limits`)."""
    media_limits = MediaLimits.of("serving.limits", limits or ServingLimits())
    repo = write_triton_repository(model_dir, out_dir, limits=media_limits)
    return json.loads((repo / "export_report.json").read_text())
