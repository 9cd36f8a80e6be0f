"""The ML steps (data prep, init, training stages, evaluation, export) as plain functions.
The KFP components in `components/pipeline_components.py` are thin adapters over these and over
`components.lifecycle`: they map artifacts to paths and call in. Everything here runs without KFP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from components import tracking
from components.config import OmniConfig
from components.lifecycle import mlflow_uri
from components.report import html_report, write_report
from model.data import EncodedDataset, read_records
from model.evaluate import EvalResult, evaluate
from model.export import write_triton_repository
from model.inference import OmniChat
from model.modeling import TOKENIZER_DIR, OmniModel
from model.prep import prepare
from model.processor import OmniProcessor
from model.tokenizer import load_tokenizer
from model.train import train_stage


def data_prep(cfg: OmniConfig, inputs: list[Path], out_dir: Path, parent_run_id: str, progress: bool = True) -> dict:
    result = prepare(inputs, out_dir, cfg.data, cfg.model, progress=progress)
    uri = mlflow_uri(cfg)
    with tracking.stage_run(uri, cfg.tracking.experiment, parent_run_id, "data-prep", params=cfg.data.model_dump()) as run:
        m = result.manifest
        run.log_metrics({"records_in": m["records_in"], "records_out": m["records_out"],
                         "records_quarantined": m["records_quarantined"]})
        tracking.log_artifact(uri, run.run_id, out_dir / "manifest.json")
        tracking.log_artifact(uri, run.run_id, out_dir / "quarantine.jsonl")
    return result.manifest


def init_model(cfg: OmniConfig, data_dir: Path, out_dir: Path) -> Path:
    """The starting checkpoint: the configured pretrained one, or fresh weights from the model
    config with the tokenizer data prep trained."""
    if cfg.model.pretrained:
        shutil.copytree(cfg.model.pretrained, out_dir, dirs_exist_ok=True)
        return out_dir
    tokenizer = load_tokenizer(data_dir / TOKENIZER_DIR)
    torch.manual_seed(cfg.data.seed)
    processor = OmniProcessor(tokenizer, cfg.model)
    OmniModel(cfg.model, len(tokenizer), processor.placeholder_ids).save_pretrained(out_dir, tokenizer)
    return out_dir


def train(cfg: OmniConfig, stage_name: str, data_dir: Path, init_dir: Path, out_dir: Path,
          parent_run_id: str, progress: bool = True) -> dict:
    """One training stage from `init_dir` to `out_dir`; skipped stages pass the checkpoint on."""
    stage = cfg.stages[stage_name]
    if stage_name in cfg.run.skip_stages or stage_name not in cfg.stages:
        shutil.copytree(init_dir, out_dir, dirs_exist_ok=True)
        return {"skipped": True, "steps": 0}
    model = OmniModel.from_pretrained(init_dir)
    tokenizer = load_tokenizer(init_dir / TOKENIZER_DIR)
    processor = OmniProcessor(tokenizer, model.cfg)
    dataset = EncodedDataset(read_records(data_dir / "train.jsonl"), data_dir, processor, stage.data_tasks)
    uri = mlflow_uri(cfg)
    with tracking.stage_run(uri, cfg.tracking.experiment, parent_run_id, f"train-{stage_name}",
                            params={"stage": stage.model_dump(), "model": cfg.model.model_dump(),
                                    "train_samples": len(dataset)}) as run:
        result = train_stage(model, processor, dataset, stage, checkpoint_dir=out_dir / "deepspeed",
                             progress=progress)
        tracking.log_metric_history(uri, run.run_id, "loss", result.losses)
        summary = {"final_loss": result.losses[-1], "first_loss": result.losses[0], "seconds": result.seconds,
                   "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
                   "trainable_params": result.trainable_params}
        run.log_metrics(summary)
    shutil.rmtree(out_dir / "deepspeed", ignore_errors=True)  # resumable state; the checkpoint below is what flows on
    model.save_pretrained(out_dir, tokenizer)
    write_losses(out_dir, {**read_losses(init_dir), stage_name: result.losses})
    return {"skipped": False, "steps": len(result.losses), "losses": result.losses, **summary}


def read_losses(model_dir: Path) -> dict[str, list[float]]:
    """Loss curves of every stage so far; each checkpoint carries its history for the report."""
    path = model_dir / "losses.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_losses(model_dir: Path, curves: dict[str, list[float]]) -> None:
    (model_dir / "losses.json").write_text(json.dumps(curves))


def _eval(model_dir: Path, data_dir: Path, cfg: OmniConfig, progress: bool) -> EvalResult:
    return evaluate(OmniChat.load(model_dir), read_records(data_dir / "val.jsonl"), data_dir, cfg.evaluation, progress)


def run_evaluation(cfg: OmniConfig, data_dir: Path, model_dir: Path, baseline_dir: Path | None, out_dir: Path,
                   parent_run_id: str, progress: bool = True) -> dict:
    """Evaluate the trained model (and the untrained baseline, for the before/after table) on the
    held-out split; write metrics.json and report.html into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    after = _eval(model_dir, data_dir, cfg, progress)
    before = _eval(baseline_dir, data_dir, cfg, progress) if baseline_dir else None
    html = html_report(
        f"Evaluation — {cfg.run.name}", before.overall if before else None, after.overall, after.per_task,
        after.examples, read_losses(model_dir), per_task_before=before.per_task if before else None,
        meta={"model": cfg.model.name, "val examples": str(sum(after.counts.values()))},
    )
    write_report(out_dir / "report.html", html)
    summary = {"overall": after.overall, "per_task": after.per_task, "counts": after.counts,
               "before": before.overall if before else None,
               "per_task_before": before.per_task if before else None}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in after.predictions))
    uri = mlflow_uri(cfg)
    with tracking.stage_run(uri, cfg.tracking.experiment, parent_run_id, "evaluate",
                            params=cfg.evaluation.model_dump()) as run:
        run.log_metrics(after.overall)
        run.log_metrics({f"{task}.{k}": v for task, ms in after.per_task.items() for k, v in ms.items()})
        if before:
            run.log_metrics({f"baseline.{k}": v for k, v in before.overall.items()})
        tracking.log_artifacts(uri, run.run_id, out_dir, "evaluation")
    return summary


def export(model_dir: Path, out_dir: Path) -> dict:
    repo = write_triton_repository(model_dir, out_dir)
    return json.loads((repo / "export_report.json").read_text())


