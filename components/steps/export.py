"""The export step: the trained checkpoint as a Triton model repository (ONNX encoders checked
against torch, the LLM, the entry model); returns the export report."""

from __future__ import annotations

import json
from pathlib import Path

from model.export.triton import write_triton_repository


def export(model_dir: Path, out_dir: Path) -> dict:
    repo = write_triton_repository(model_dir, out_dir)
    return json.loads((repo / "export_report.json").read_text())
