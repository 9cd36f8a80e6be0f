"""Benchmark runner: greedy answers for every held-out record, scored per task.

Records are grouped by task and generated in batches with the KV cache; each task is scored with
its family's metric (see `model.eval.metrics.score_task`) and the overall metrics are example-weighted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from model.config import EvalConfig
from model.data.loading import to_chat_input
from model.data.records import Record
from model.eval.metrics import aggregate, score_task, worst_examples
from model.media.decode import Source
from model.nn.generation import OmniChat


@dataclass
class EvalResult:
    overall: dict[str, float]
    per_task: dict[str, dict[str, float]]
    counts: dict[str, int]
    examples: list[dict] = field(default_factory=list)  # worst few per task
    predictions: list[dict] = field(default_factory=list)


def prompt_text(record: Record) -> str:
    return "\n".join(m.content for m in record.prompt_messages if m.role == "user")


def evaluate(chat: OmniChat, records: list[Record], fetch: Callable[[str], Source], cfg: EvalConfig,
             progress: bool = True) -> EvalResult:
    """Greedy answers for `records` (their media read with `fetch(uri)`: bytes or a path), scored per task."""
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records[: cfg.max_samples] if cfg.max_samples else records:
        by_task[r.task].append(r)
    result = EvalResult(overall={}, per_task={}, counts={})
    bar = tqdm(total=sum(map(len, by_task.values())), desc="evaluate", unit="ex", disable=not progress)
    for task, recs in sorted(by_task.items()):
        preds = []
        for i in range(0, len(recs), cfg.batch_size):
            batch = [to_chat_input(r, None, chat.model.cfg, include_answer=False, fetch=fetch)
                     for r in recs[i : i + cfg.batch_size]]
            preds.extend(chat.generate(batch, max_new_tokens=cfg.max_new_tokens))
            bar.update(len(batch))
        refs, prompts = [r.reference for r in recs], [prompt_text(r) for r in recs]
        result.per_task[task] = score_task(task, preds, refs, prompts)
        result.counts[task] = len(recs)
        result.examples.extend(worst_examples(task, preds, refs, prompts, k=3))
        result.predictions.extend(
            {"id": r.id, "task": task, "prediction": p, "reference": ref}
            for r, p, ref in zip(recs, preds, refs, strict=True)
        )
    bar.close()
    result.overall = aggregate(result.per_task, result.counts)
    return result
