"""The data-prep step, and the pipeline's data input read in one place: `data_uri` is JSONL files
or folders of them, comma-separated, local or s3://."""

from __future__ import annotations

from pathlib import Path

from components.config import TaskConfig
from components.registry.records import write_record
from components.reports.data_prep import data_report
from components.reports.html import write_report
from model.data.prep import prepare


def data_inputs(data_uri: str) -> list[str]:
    """The entries of the pipeline's data input (`a.jsonl, s3://b/records/` -> two entries)."""
    return [part.strip() for part in data_uri.split(",") if part.strip()]


def data_root(data_uri: str) -> str:
    """The folder the data input lives in (its first entry; a file's folder): where the benchmark
    paths of the config resolve when `evaluation.data_root` is unset."""
    first = data_inputs(data_uri)[0]
    return first if first.startswith("s3://") or Path(first).is_dir() else str(Path(first).parent)


def data_prep(cfg: TaskConfig, data_uri: str, out_dir: Path, progress: bool = True) -> dict:
    """Validate, normalise, dedup, split and shard the records of `data_uri` (data_inputs)
    into `out_dir`, with report.html (quarantine reasons, modality mix, length histograms) and the
    record register logs to MLflow (components.registry.records)."""
    result = prepare(data_inputs(data_uri), out_dir, cfg.data, cfg.model, progress=progress)
    write_report(out_dir / "report.html", data_report(result.manifest, result.quarantined, result.stats))
    write_record(out_dir, "data-prep", params=cfg.data.model_dump(), metrics=data_prep_metrics(result.manifest),
                 files=["manifest.json", "quarantine.jsonl", "report.html"])
    return result.manifest


def data_prep_metrics(manifest: dict) -> dict[str, float]:
    """The counts worth a metric: accounting, splits, quarantine kinds, modality mix."""
    m = manifest
    out = {k: m[k] for k in ("records_in", "records_out", "records_quarantined")}
    out |= {f"split.{k}": v for k, v in m["splits"].items()}
    out |= {f"quarantined.{k.replace('/', '_').replace(' ', '_')}": v for k, v in m["quarantine_reasons"].items()}
    out |= {f"modality.{k}": v["records"] for k, v in m["modalities"].items()}
    return out
