"""The metric registry: each benchmark names one of these, `omni eval score --metric NAME` too, and
both go through `score_rows`, so a score means the same wherever it was computed.

| name              | per item                                                   | benchmark value             |
|-------------------|------------------------------------------------------------|-----------------------------|
| mcq_accuracy      | the picked option letter == the key (CircularEval: per group, all rotations right) | mean |
| vqa_accuracy      | EvalAI-normalised matches among 10 human answers, min(1, n/3) averaged leave-one-out | mean |
| anls              | 1 - normalised edit distance, 0 below 0.5 (DocVQA)          | mean                        |
| relaxed_accuracy  | within 5% of a numeric key, else exact (ChartQA)            | mean                        |
| ocrbench_accuracy | a key contained in the answer (OCRBench)                    | mean                        |
| exact_match       | VQA-normalised equality with a key                          | mean                        |
| wer / cer         | utterance error rate after the language's normaliser        | pooled edits / pooled words |
| bleu              | sentence BLEU                                               | sacrebleu corpus BLEU       |

Accuracies, ANLS and error rates are fractions (0-1); BLEU is 0-100 (sacrebleu's scale). Each value
comes with its standard error: from the per-item spread for means (binomial for 0/1 scores), by
bootstrap over utterances for corpus metrics. A row marked failed is scored as an empty answer, so a
benchmark never looks better for the items it could not run.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.config import BENCHMARK_METRICS, LOWER_IS_BETTER_METRICS
from model.eval.answers import anls, exact_match, ocrbench_match, relaxed_correct, vqa_accuracy
from model.eval.items import ScoreRow
from model.eval.mcq import gold_letter, pick_option
from model.eval.speech import Edits, char_edits, corpus_bleu, corpus_rate, sentence_bleu, word_edits

LOWER_IS_BETTER = LOWER_IS_BETTER_METRICS
CORPUS = frozenset({"wer", "cer", "bleu"})
METRICS = BENCHMARK_METRICS


def higher_is_better(metric: str) -> bool:
    """Direction of a metric, also for qualified names ("asr/cer", "fleurs_zh.cer")."""
    return not any(part in LOWER_IS_BETTER for part in re.split(r"[./]", metric))


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


@dataclass
class ItemScore:
    id: str
    score: float
    letter: str | None = None  # MCQ: the option the answer picked (None: none or several)
    failed: str | None = None

    def to_json(self, mcq: bool) -> dict:
        out: dict = {"id": self.id, "score": self.score}
        if mcq:
            out["letter"] = self.letter
        if self.failed:
            out["failed"] = self.failed
        return out


@dataclass
class Score:
    metric: str
    value: float
    stderr: float | None
    n: int  # units the value averages over: items, or question groups under CircularEval
    items: list[ItemScore]
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)
    signature: str | None = None  # BLEU: sacrebleu's signature

    @property
    def failed(self) -> int:
        return sum(1 for i in self.items if i.failed)

    def summary(self) -> dict:
        out = {"metric": self.metric, "value": self.value, "stderr": self.stderr, "n": self.n,
               "items": len(self.items), "failed": self.failed}
        if self.by_category:
            out["by_category"] = self.by_category
        if self.signature:
            out["signature"] = self.signature
        return out


def item_score(metric: str, row: ScoreRow, lang: str | None = None) -> ItemScore:
    """One row's score in `metric` (utterance WER/CER, sentence BLEU for the corpus metrics)."""
    _check_metric(metric)
    pred, lang = ("" if row.failed else row.prediction), row.lang or lang
    if metric == "mcq_accuracy":
        choices = row.choices or {}
        picked = pick_option(pred, choices)
        return ItemScore(row.id, float(picked == gold_letter(row.answers[0], choices)), picked, row.failed)
    scorers = {
        "vqa_accuracy": lambda: vqa_accuracy(pred, row.answers),
        "anls": lambda: anls(pred, row.answers),
        "relaxed_accuracy": lambda: float(any(relaxed_correct(pred, a) for a in row.answers)),
        "ocrbench_accuracy": lambda: ocrbench_match(pred, row.answers, row.category.get("dataset") == "HME100k"),
        "exact_match": lambda: exact_match(pred, row.answers),
        "wer": lambda: word_edits(row.answers[0], pred, lang).rate,
        "cer": lambda: char_edits(row.answers[0], pred, lang).rate,
        "bleu": lambda: sentence_bleu(row.answers[0], pred, lang),
    }
    return ItemScore(row.id, float(scorers[metric]()), None, row.failed)


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=float)
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else None
    return float(arr.mean()), stderr


def _units(rows: Sequence[ScoreRow], items: Sequence[ItemScore]) -> list[float]:
    """Per-question scores: a CircularEval group scores 1 only if every rotation does."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row, item in zip(rows, items, strict=True):
        groups[row.group or row.id].append(item.score)
    return [min(v) for v in groups.values()]


def _corpus(metric: str, rows: Sequence[ScoreRow], lang: str | None, bootstrap: int,
            seed: int) -> tuple[float, float | None, str | None]:
    refs = [r.answers[0] for r in rows]
    preds = ["" if r.failed else r.prediction for r in rows]
    if metric == "bleu":
        langs = {r.lang or lang for r in rows}
        result = corpus_bleu(refs, preds, langs.pop() if len(langs) == 1 else lang, bootstrap)
        return result.score, result.stderr, result.signature
    count = word_edits if metric == "wer" else char_edits
    edits = [count(ref, pred, r.lang or lang) for ref, pred, r in zip(refs, preds, rows, strict=True)]
    return corpus_rate(edits), _bootstrap_rate(edits, bootstrap, seed), None


def _bootstrap_rate(edits: Sequence[Edits], resamples: int, seed: int) -> float | None:
    if resamples < 2 or len(edits) < 2:
        return None
    errors = np.array([e.errors for e in edits], dtype=float)
    lengths = np.array([e.length for e in edits], dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(edits), size=(resamples, len(edits)))
    rates = errors[idx].sum(1) / np.maximum(lengths[idx].sum(1), 1.0)
    return float(rates.std(ddof=1))


def _value(metric: str, rows: Sequence[ScoreRow], items: Sequence[ItemScore], lang: str | None,
           bootstrap: int, seed: int) -> tuple[float, float | None, int, str | None]:
    if metric in CORPUS:
        value, stderr, signature = _corpus(metric, rows, lang, bootstrap, seed)
        return value, stderr, len(rows), signature
    units = _units(rows, items)
    value, stderr = _mean_and_stderr(units)
    return value, stderr, len(units), None


def score_rows(metric: str, rows: Sequence[ScoreRow], lang: str | None = None, *,
               categories: Iterable[str] | None = None, bootstrap: int = 1000, seed: int = 0) -> Score:
    """Score answers in `metric`. `lang` is the default for rows without one; `categories`: the
    category fields to break the value down by (None: every field the rows carry)."""
    _check_metric(metric)
    if not rows:
        raise ValueError("no rows to score")
    items = [item_score(metric, r, lang) for r in rows]
    value, stderr, n, signature = _value(metric, rows, items, lang, bootstrap, seed)
    fields = list(categories) if categories is not None else sorted({k for r in rows for k in r.category})
    by_category: dict[str, dict[str, float]] = {}
    for name in fields:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            if name in r.category:
                groups[r.category[name]].append(i)
        by_category[name] = {
            value_: _value(metric, [rows[i] for i in idx], [items[i] for i in idx], lang, 0, seed)[0]
            for value_, idx in sorted(groups.items())
        }
    return Score(metric, value, stderr, n, items, {k: v for k, v in by_category.items() if v}, signature)


def aggregate(results: Mapping[str, Mapping[str, float]], counts: Mapping[str, int] | None = None) -> dict[str, float]:
    """Cross-benchmark means: each metric averaged over the benchmarks that report it, weighted by
    `counts[benchmark]` (items; equal weights when None)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for task, metrics in results.items():
        if counts is not None and task not in counts:
            raise KeyError(f"no example count for task {task!r}")
        w = float(counts[task]) if counts is not None else 1.0
        if w <= 0:
            continue
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + w * value
            weights[name] = weights.get(name, 0.0) + w
    return {name: sums[name] / weights[name] for name in sums}
