"""The evaluate step: a checkpoint on the selected benchmarks, behind the DAG's evaluate tasks
(`run_evaluation`) and `omni eval run` (`evaluate_checkpoint`).

For each benchmark in the config's `benchmark:` section: resolve its data (a relative path against
`evaluation.data_root` or the folder of the pipeline's data input, `steps.data.data_root`; s3:// is
downloaded once into the work folder),
read it with its reader, answer it with the runner (cached, resumable, sharded by rank), score it
with its metric. The result is one summary (`metrics.json`), the per-item predictions with their
scores, and the HTML report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.config import TaskConfig
from components.registry.gate import eval_record
from components.registry.records import write_record
from components.reports.html import evaluation_report, write_report
from components.steps.data import data_root
from components.steps.training import read_losses
from model import runtime
from model.config import BenchmarkConfig
from model.eval.cache import PredictionCache, cache_key, checkpoint_fingerprint
from model.eval.metrics import Score, aggregate, higher_is_better, score_rows
from model.eval.readers import BenchData, read_benchmark
from model.eval.runner import BenchmarkRun, run_benchmark
from model.nn.generation import OmniChat
from model.storage import open_store

WORST = 5  # examples per benchmark in the report


def selected(cfg: TaskConfig, names: list[str] | None = None) -> dict[str, BenchmarkConfig]:
    """The benchmarks to run: `names`, or every entry of the config's `benchmark:` section."""
    names = names or list(cfg.benchmark)
    unknown = [n for n in names if n not in cfg.benchmark]
    if unknown:
        raise KeyError(f"unknown benchmark(s) {unknown}; the config has {sorted(cfg.benchmark)} "
                       f"(select with benchmark=[{','.join(unknown)}])")
    return {n: cfg.benchmark[n] for n in names}


def resolve_data(cfg: TaskConfig, name: str, spec: BenchmarkConfig, data_uri: str | None) -> Path:
    """The benchmark's data as a local path: a relative path under evaluation.data_root, else under
    the folder of `data_uri` (the pipeline's data input); s3:// data is downloaded once into run.workdir."""
    if not spec.data:
        raise FileNotFoundError(f"benchmark {name} has no data: set benchmark.{name}.data=PATH "
                                f"(or `omni eval run --benchmark {name} --data PATH`)")
    root = cfg.evaluation.data_root or (data_root(data_uri) if data_uri else None)
    uri = spec.data
    if not (uri.startswith("s3://") or Path(uri).is_absolute()) and root:
        uri = f"{root.rstrip('/')}/{uri}"
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"benchmark {name}: data {path} does not exist (set benchmark.{name}.data)")
        return path
    local = cfg.workdir() / "benchmark-data" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (local / ".complete").exists():
        bucket_uri, _, key = uri.rpartition("/")
        store = open_store(bucket_uri)
        if store.exists(key):  # a single file
            store.download_file(key, local / key)
        else:
            store.download_dir(key, local / key)
        (local / ".complete").touch()
    return local / uri.rpartition("/")[2]


def _result(name: str, spec: BenchmarkConfig, data: BenchData, score: Score) -> dict:
    return {"title": spec.title, "family": spec.family, "paper": spec.paper, "lang": spec.lang,
            **score.summary(), "data_sha256": data.sha256, "read_failures": len(data.failures),
            "higher_is_better": higher_is_better(spec.metric)}


def _worst(name: str, run: BenchmarkRun, score: Score, metric: str, k: int = WORST) -> list[dict]:
    """The k worst-scored items, worst first, in the report's example shape."""
    sign = -1 if not higher_is_better(metric) else 1
    order = sorted(range(len(score.items)), key=lambda i: sign * score.items[i].score)
    out = []
    for i in order[:k]:
        row = run.rows[i]
        out.append({"task": name, "prompt": run.prompts.get(row.id, ""), "reference": " | ".join(row.answers),
                    "prediction": f"(failed: {row.failed})" if row.failed else row.prediction,
                    "score": score.items[i].score})
    return out


def evaluate_checkpoint(cfg: TaskConfig, model_dir: Path, out_dir: Path, names: list[str] | None = None,
                        data_uri: str | None = None, progress: bool = True,
                        context: Mapping[str, Any] | None = None) -> dict | None:
    """Run and score the benchmarks on `model_dir`; writes metrics.json (the summary, with `context`'s
    keys: what the caller puts beside the scores) and predictions.jsonl into `out_dir` and returns the
    summary (None on ranks other than the primary)."""
    specs = selected(cfg, names)
    paths = {name: resolve_data(cfg, name, spec, data_uri) for name, spec in specs.items()}  # fail before loading
    chat = OmniChat.load(model_dir)
    store = open_store(cfg.evaluation.cache_uri or str(cfg.workdir() / "eval-cache"))
    fingerprint = checkpoint_fingerprint(model_dir)
    rank = runtime.ranks().rank
    results, examples, failures, lines = {}, [], {}, []
    for name, spec in specs.items():
        data = read_benchmark(spec, paths[name])
        key = cache_key(fingerprint, spec.model_dump_json(), data.sha256, str(cfg.evaluation.max_samples))
        run = run_benchmark(chat, name, spec, data, cfg.evaluation, PredictionCache(store, key, rank), progress)
        if not run.rows:
            continue
        score = score_rows(spec.metric, run.rows, spec.lang, categories=spec.categories or None,
                           bootstrap=cfg.evaluation.bootstrap, seed=cfg.evaluation.seed)
        results[name] = _result(name, spec, data, score) | {"answered": run.answered, "cached": run.cached}
        examples += _worst(name, run, score, spec.metric)
        failures[name] = [{"id": f.id, "reason": f.reason} for f in data.failures] + [
            {"id": r.id, "reason": r.failed} for r in run.rows if r.failed]
        lines += [{"benchmark": name, **r.model_dump(exclude_none=True), **s.to_json(spec.metric == "mcq_accuracy")}
                  for r, s in zip(run.rows, score.items, strict=True)]
    if not runtime.ranks().primary:
        return None
    summary = {"benchmarks": results, "overall": overall(results), "examples": examples, "failures": failures,
               **(context or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out_dir / "predictions.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return summary


def overall(results: dict[str, dict]) -> dict[str, float]:
    """Cross-benchmark means of each metric, weighted by items (the figures the old gate compared)."""
    return aggregate({n: {r["metric"]: r["value"]} for n, r in results.items()},
                     {n: r["items"] for n, r in results.items()})


def run_evaluation(cfg: TaskConfig, data_uri: str | None, model_dir: Path, out_dir: Path,
                   before_dir: Path | None = None, progress: bool = True) -> dict | None:
    """The DAG's evaluate step: score `model_dir` on the configured benchmarks (`benchmark:`;
    `data_uri`: the pipeline's data input, see resolve_data) next to `before_dir`'s results (the
    initial checkpoint's, evaluated by its own task) when given; write metrics.json,
    predictions.jsonl, report.html and the record register logs to MLflow into `out_dir`."""
    before = json.loads((before_dir / "metrics.json").read_text()) if before_dir else None
    compared = None if before is None else {
        "source": "initial checkpoint", "benchmarks": before["benchmarks"], "overall": before["overall"]}
    summary = evaluate_checkpoint(cfg, model_dir, out_dir, data_uri=data_uri, progress=progress,
                                  context={"before": compared})
    if summary is None:  # not the primary rank
        return None
    meta = {"model": cfg.model.name, "benchmarks": ", ".join(summary["benchmarks"]),
            "before": "initial checkpoint" if before else "none"}
    write_report(out_dir / "report.html", evaluation_report("Evaluation", summary, read_losses(model_dir), meta))
    values, data_tags = eval_record(summary)
    signatures = {f"{n}.bleu_signature": r["signature"] for n, r in summary["benchmarks"].items() if r.get("signature")}
    params = {"evaluation": cfg.evaluation.model_dump(),
              "benchmark": {n: b.model_dump() for n, b in cfg.benchmark.items()}}
    write_record(out_dir, "evaluate", params, values, tags=signatures | data_tags,
                 files=["metrics.json", "predictions.jsonl", "report.html"])
    return summary
