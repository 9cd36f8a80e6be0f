"""The training steps as plain functions: the starting checkpoint, one stage, the SFT loss filter.
The KFP components (`components.pipeline_components`) are thin adapters over these and the other
steps (`components.steps`): they map artifacts to paths and call in. Nothing here knows KFP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.config import TaskConfig, sft_filter_tasks
from components.registry.records import RECORD_FILE, write_record
from components.reports.html import stage_report, write_report
from components.reports.sft_filter import filter_report
from components.stages import FILTERED_STAGE
from model import runtime
from model.data.loading import to_chat_input
from model.data.shards import ShardStream
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


def init_model(cfg: TaskConfig, data_dir: Path, out_dir: Path) -> Path:
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


def train(cfg: TaskConfig, stage_name: str, data_dir: Path | str, init_dir: Path, out_dir: Path,
          progress: bool = True, sft_filter_dir: Path | None = None, checkpoint_dir: Path | None = None) -> dict:
    """One training stage from `init_dir` to `out_dir`; skipped stages pass the checkpoint on.
    `data_dir`: data prep's output, a folder or a store URI (s3://...) the shards stream from.
    `sft_filter_dir`: the loss filter's output; the samples it dropped are left out.
    `checkpoint_dir`: where the resumable DeepSpeed state lives (default `out_dir/deepspeed`); a
    TrainJob passes a volume every rank shares and that outlives its pods, so a restart resumes.

    The one entry of a stage, wherever it runs: the DAG's stage task, every rank of a TrainJob
    (components/train_entry.py) that the DAG's launcher task submits for multi-node stages, and
    `omni train` (alone or under torchrun). Rank 0 writes the checkpoint, its record (params,
    metrics, the loss curve; components.registry.records) and report.html."""
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
               "data_wait_fraction": result.data_wait_seconds / max(result.seconds, 1e-9),
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


def _train_stream(cfg: TaskConfig, tasks: list[str], data_dir: Path | str, sft_filter_dir: Path | None) -> ShardStream:
    """Data prep's train shards (local or s3://) as a stream: rank/worker split, resumable position."""
    return ShardStream(data_dir, "train", tasks, exclude_ids=read_filtered_out(sft_filter_dir),
                       shuffle_buffer=cfg.data.shuffle_buffer, cache_bytes=int(cfg.data.reader_cache_mb * 2**20),
                       num_workers=runtime.loader_workers(cfg.data.loader_workers))


FILTER_FILE = "sft_filter.json"


def sft_filter(cfg: TaskConfig, data_dir: Path, model_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Loss-based SFT filter: score the SFT samples with `model_dir` (the checkpoint SFT starts
    from), drop those outside mean +- k std of their group; writes sft_filter.json + report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fcfg, tasks = cfg.sft_filter, sft_filter_tasks(cfg)
    if not fcfg.enabled or tasks is None or FILTERED_STAGE in cfg.run.skip_stages:
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


