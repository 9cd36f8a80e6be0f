"""The ML steps (data prep, init, training stages, evaluation, export) as plain functions.
The KFP components in `components/pipeline_components.py` are thin adapters over these and over
`components.lifecycle`: they map artifacts to paths and call in. Everything here runs without KFP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.config import OmniConfig, sft_filter_tasks
from components.data_report import data_report
from components.evaluation import evaluate_checkpoint
from components.filter_report import filter_report
from components.gate import eval_record
from components.records import RECORD_FILE, write_record
from components.report import evaluation_report, stage_report, write_report
from model import runtime
from model.data.loading import to_chat_input
from model.data.prep import prepare
from model.data.shards import ShardStream
from model.export.triton import write_triton_repository
from model.media.limits import MediaLimits
from model.nn.checkpoint import TOKENIZER_DIR
from model.nn.compose import compose
from model.nn.omni import OmniModel
from model.nn.sources import is_remote, resolve
from model.storage import open_store
from model.text.processor import OmniProcessor
from model.text.tokenizer import load_tokenizer
from model.training.loading import build_for_stage
from model.training.recipe import train_stage
from model.training.sft_filter import loss_filter, sample_losses
from serving.config import ServingLimits


def data_prep(cfg: OmniConfig, inputs: list[str | Path], out_dir: Path, progress: bool = True) -> dict:
    """Validate, normalise, dedup, split and shard `inputs` (JSONL files/folders, local or s3://)
    into `out_dir`, with report.html (quarantine reasons, modality mix, length histograms) and the
    record register logs to MLflow (components.records)."""
    result = prepare(inputs, out_dir, cfg.data, cfg.model, progress=progress)
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


def init_model(cfg: OmniConfig, data_dir: Path, out_dir: Path) -> Path:
    """The starting checkpoint: the omni checkpoint `model.pretrained` (folder or s3://), or one
    composed from `model.init`'s Hugging Face parts (fresh weights where a part is not given) with the
    tokenizer data prep used; `compose_report.json` says what came from where."""
    if cfg.model.pretrained:
        resolve(cfg.model)  # the config must describe the checkpoint it continues from
        if is_remote(cfg.model.pretrained):
            open_store(cfg.model.pretrained).download_dir("", out_dir)
        else:
            shutil.copytree(cfg.model.pretrained, out_dir, dirs_exist_ok=True)
        return out_dir
    report = compose(cfg.model, out_dir, tokenizer=load_tokenizer(data_dir / TOKENIZER_DIR), seed=cfg.data.seed)
    (out_dir / "compose_report.json").write_text(json.dumps(report, indent=2))
    return out_dir


def train(cfg: OmniConfig, stage_name: str, data_dir: Path | str, init_dir: Path, out_dir: Path,
          progress: bool = True, sft_filter_dir: Path | None = None, checkpoint_dir: Path | None = None) -> dict:
    """One training stage from `init_dir` to `out_dir`; skipped stages pass the checkpoint on.
    `data_dir`: data prep's output, a folder or a store URI (s3://...) the shards stream from.
    `sft_filter_dir`: the loss filter's output; the samples it dropped are left out.
    `checkpoint_dir`: where the resumable DeepSpeed state lives (default `out_dir/deepspeed`); a
    TrainJob passes a volume every rank shares and that outlives its pods, so a restart resumes.

    The one entry of a stage, wherever it runs: the DAG's stage task, every rank of a TrainJob
    (components/train_entry.py) that the DAG's launcher task submits for multi-node stages, and
    `omni train` (alone or under torchrun). Rank 0 writes the checkpoint, its record (params,
    metrics, the loss curve; components.records) and report.html."""
    if stage_name in cfg.run.skip_stages or stage_name not in cfg.stages:  # the checkpoint passes on, its record not
        shutil.copytree(init_dir, out_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(RECORD_FILE, "report.html"))
        return {"skipped": True, "steps": 0}
    stage = cfg.stages[stage_name]
    model = build_for_stage(init_dir, stage)  # on its device (ZeRO-3: partitioned as it is built)
    tokenizer = load_tokenizer(init_dir / TOKENIZER_DIR)
    processor = OmniProcessor(tokenizer, model.cfg)
    dataset = _train_stream(cfg, stage.data_tasks, data_dir, sft_filter_dir)
    state = checkpoint_dir or out_dir / "deepspeed"
    result = train_stage(model, processor, dataset, stage, checkpoint_dir=state, progress=progress)
    summary = {"steps": len(result.losses), "first_loss": result.losses[0], "final_loss": result.losses[-1],
               "seconds": result.seconds, "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
               "trainable_params": result.trainable_params}
    if checkpoint_dir is None:  # resumable state; the checkpoint below is what flows on
        shutil.rmtree(out_dir / "deepspeed", ignore_errors=True)
    if runtime.ranks().primary:  # under torchrun every rank trains; only global rank 0 saves and records
        model.save_pretrained(out_dir, tokenizer)
        write_losses(out_dir, {**read_losses(init_dir), stage_name: result.losses})
        write_report(out_dir / "report.html", stage_report(stage_name, result.losses, summary))
        params = {"stage": stage.model_dump(), "model": cfg.model.model_dump(), "train_samples": dataset.num_samples()}
        write_record(out_dir, f"train-{stage_name}", params, summary, {"loss": result.losses}, ["report.html"])
    return {"skipped": False, "losses": result.losses, **summary}


STAGE_METRICS = ("steps", "first_loss", "final_loss", "tokens_per_second")


def log_metrics(metrics, values: dict[str, float]) -> None:
    """`values` into a KFP Metrics output (`metrics`: its artifact), and as JSON into the artifact's
    file: kfp.local reuses a cached task only if every output file exists, and log_metric alone
    writes none (the values travel in the executor's output)."""
    for key, value in values.items():
        metrics.log_metric(key, value)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(values, indent=2, sort_keys=True))


def stage_outputs(stage: str, result: dict, out_dir: Path, metadata: dict, metrics, report_path: Path) -> None:
    """A stage task's KFP outputs from its result: the model's metadata, the Metrics, the HTML report."""
    metadata["stage"] = stage
    log_metrics(metrics, {key: result[key] for key in STAGE_METRICS if key in result})
    if (out_dir / "report.html").is_file() and not result.get("skipped"):
        shutil.copy(out_dir / "report.html", report_path)
    else:
        write_report(report_path, f"<html><body><p>Stage {stage} was skipped (run.skip_stages): its input "
                                  "checkpoint was passed on.</p></body></html>")


def _train_stream(cfg: OmniConfig, tasks: list[str], data_dir: Path | str, sft_filter_dir: Path | None) -> ShardStream:
    """Data prep's train shards (local or s3://) as a stream: rank/worker split, resumable position."""
    return ShardStream(data_dir, "train", tasks, exclude_ids=read_filtered_out(sft_filter_dir),
                       shuffle_buffer=cfg.data.shuffle_buffer, cache_bytes=int(cfg.data.reader_cache_mb * 2**20),
                       num_workers=runtime.loader_workers(cfg.data.loader_workers))


FILTER_FILE = "sft_filter.json"


def sft_filter(cfg: OmniConfig, data_dir: Path, model_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Loss-based SFT filter: score the SFT samples with `model_dir` (the checkpoint SFT starts
    from), drop those outside mean +- k std of their group; writes sft_filter.json + report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fcfg, tasks = cfg.sft_filter, sft_filter_tasks(cfg)
    if not fcfg.enabled or tasks is None or "sft" in cfg.run.skip_stages:
        summary = {"enabled": False, "kept": None, "dropped": []}
        (out_dir / FILTER_FILE).write_text(json.dumps(summary, indent=2))
        write_report(out_dir / "report.html", "<html><body><p>SFT loss filter disabled.</p></body></html>")
        return summary
    model = runtime.place(OmniModel.from_pretrained(model_dir))
    processor = OmniProcessor(load_tokenizer(model_dir / TOKENIZER_DIR), model.cfg)
    stream = ShardStream(data_dir, "train", tasks)
    records = list(stream.records())
    # Encoded lazily, one batch at a time: at SFT scale the decoded media would not fit in memory.
    samples = (processor.encode(to_chat_input(r, None, model.cfg, fetch=stream.store.read_bytes)) for r in records)
    losses = sample_losses(model, processor, samples, fcfg.batch_size, progress=progress, total=len(records))
    result = loss_filter([r.id for r in records], [r.task for r in records], losses, fcfg)
    by_group: dict[str, list[float]] = {}
    for r, loss in zip(records, losses, strict=True):
        by_group.setdefault(r.task if fcfg.group_by == "task" else "all", []).append(loss)
    dropped = result.dropped_ids
    texts = {r.id: "\n".join(f"{m.role}: {m.content}" for m in r.messages) for r in records if r.id in dropped}
    write_report(out_dir / "report.html", filter_report(result, by_group, texts, fcfg.k_sigma, fcfg.examples))
    summary = {"enabled": True, "config": fcfg.model_dump(), **result.to_json()}
    (out_dir / FILTER_FILE).write_text(json.dumps(summary, indent=2))
    metrics = {"kept": result.kept, "dropped": len(result.dropped),
               **{f"{g}.loss_mean": f.mean for g, f in result.fits.items()},
               **{f"{g}.loss_std": f.std for g, f in result.fits.items()}}
    write_record(out_dir, "sft-filter", fcfg.model_dump(), metrics, files=[FILTER_FILE, "report.html"])
    return summary


def read_filtered_out(filter_dir: Path | None) -> set[str]:
    """Record ids the SFT filter dropped (none without a filter output)."""
    if filter_dir is None or not (filter_dir / FILTER_FILE).exists():
        return set()
    return {d["id"] for d in json.loads((filter_dir / FILTER_FILE).read_text())["dropped"]}


def read_losses(model_dir: Path) -> dict[str, list[float]]:
    """Loss curves of every stage so far; each checkpoint carries its history for the report."""
    path = model_dir / "losses.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_losses(model_dir: Path, curves: dict[str, list[float]]) -> None:
    (model_dir / "losses.json").write_text(json.dumps(curves))


def run_evaluation(cfg: OmniConfig, data_root: str | None, model_dir: Path, out_dir: Path,
                   before_dir: Path | None = None, progress: bool = True) -> dict | None:
    """Score `model_dir` on the configured benchmarks (`benchmark:`; relative data paths resolve
    against evaluation.data_root or `data_root`, the pipeline's data input), next to `before_dir`'s
    results (the initial checkpoint's, evaluated by its own task) when given; write metrics.json,
    predictions.jsonl, report.html and the record register logs to MLflow into `out_dir`."""
    summary = evaluate_checkpoint(cfg, model_dir, out_dir, data_root=data_root, progress=progress)
    if summary is None:  # not the primary rank
        return None
    before = json.loads((before_dir / "metrics.json").read_text()) if before_dir else None
    summary["before"] = None if before is None else {
        "source": "initial checkpoint", "benchmarks": before["benchmarks"], "overall": before["overall"]}
    meta = {"model": cfg.model.name, "benchmarks": ", ".join(summary["benchmarks"]),
            "before": "initial checkpoint" if before else "none"}
    write_report(out_dir / "report.html", evaluation_report("Evaluation", summary, read_losses(model_dir), meta))
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    values, data_tags = eval_record(summary)
    signatures = {f"{n}.bleu_signature": r["signature"] for n, r in summary["benchmarks"].items() if r.get("signature")}
    params = {"evaluation": cfg.evaluation.model_dump(),
              "benchmark": {n: b.model_dump() for n, b in cfg.benchmark.items()}}
    write_record(out_dir, "evaluate", params, values, tags=signatures | data_tags,
                 files=["metrics.json", "predictions.jsonl", "report.html"])
    return summary


def export(model_dir: Path, out_dir: Path, limits: ServingLimits | None = None) -> dict:
    """The Triton repository, refusing media as the endpoint does (default: the endpoint's default limits)."""
    limits = MediaLimits.of("serving.limits", limits or ServingLimits())
    repo = write_triton_repository(model_dir, out_dir, limits=limits)
    return json.loads((repo / "export_report.json").read_text())
