"""Evaluation metrics, following the conventions of lmms-eval, VLMEvalKit and OpenCompass.

- Multiple choice: the option letter is pulled out of free-form answers ("The answer is (B)",
  "答案是B", "B. because ...", a bare "b"), with the option *text* as a fallback ("red circle" when
  option A is "red circle"). Accuracy over letters.
- Open-ended QA: VQA-style normalised exact match (lowercase, no punctuation or articles,
  number words as digits).
- ASR: corpus WER and CER with `jiwer` after Whisper-style basic normalisation.
- Speech translation: corpus BLEU with `sacrebleu` (`zh` tokenizer for Chinese targets).

Tasks are dispatched by name (see `task_kind`): `*_mcq` -> multiple choice, `asr*` -> ASR,
`s2tt*` -> BLEU, anything else -> open-ended exact match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import sacrebleu

from model.eval.answers import check_pairs, exact_match
from model.eval.mcq import mcq_accuracy, mcq_correct
from model.eval.speech import bleu, bleu_tokenizer, cer, wer

TaskKind = Literal["mcq", "asr", "s2tt", "open"]

# The metric each task kind is judged by first (what "worst examples" sort on).
PRIMARY_METRIC: dict[str, str] = {"mcq": "mcq_accuracy", "asr": "wer", "s2tt": "bleu", "open": "vqa_accuracy"}
LOWER_IS_BETTER = frozenset({"wer", "cer"})
def higher_is_better(metric: str) -> bool:
    """Direction of a metric; accepts prefixed names such as "asr/wer" or "eval_wer"."""
    name = re.split(r"[/.:]", metric)[-1].lower()
    return not any(name == m or name.endswith("_" + m) for m in LOWER_IS_BETTER)


def task_kind(task: str) -> TaskKind:
    t = task.lower()
    if t == "mcq" or t.endswith("_mcq"):
        return "mcq"
    if t == "asr" or t.startswith("asr_") or t.endswith("_asr"):
        return "asr"
    if t == "s2tt" or t.startswith("s2tt_") or t.endswith("_s2tt"):
        return "s2tt"
    return "open"


def score_task(
    task: str, predictions: list[str], references: list[str], prompts: list[str] | None = None
) -> dict[str, float]:
    """Metrics for one task: `*_mcq` -> {"mcq_accuracy"}, ASR -> {"wer", "cer"},
    `s2tt*` -> {"bleu"}, anything else (captions, text/visual QA) -> {"vqa_accuracy"}."""
    check_pairs(predictions, references, prompts)
    kind = task_kind(task)
    if kind == "mcq":
        return {"mcq_accuracy": mcq_accuracy(predictions, references, prompts)}
    if kind == "asr":
        return {"wer": wer(references, predictions), "cer": cer(references, predictions)}
    if kind == "s2tt":
        return {"bleu": bleu(references, predictions)}
    return {"vqa_accuracy": sum(map(exact_match, predictions, references)) / len(references)}


def per_example_scores(
    task: str, predictions: list[str], references: list[str], prompts: list[str] | None = None
) -> list[float]:
    """One score per example in the task's primary metric: 1/0 correctness for multiple choice
    and exact match, utterance WER for ASR, sentence BLEU for translation."""
    check_pairs(predictions, references, prompts)
    kind = task_kind(task)
    if kind == "mcq":
        ps = prompts if prompts is not None else [None] * len(references)
        return [mcq_correct(p, r, q) for p, r, q in zip(predictions, references, ps, strict=True)]
    if kind == "asr":
        return [wer([r], [p]) for p, r in zip(predictions, references, strict=True)]
    if kind == "s2tt":
        tok = bleu_tokenizer(references, None)
        return [
            float(sacrebleu.sentence_bleu(p, [r], tokenize=tok).score)
            for p, r in zip(predictions, references, strict=True)
        ]
    return [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]


def worst_examples(
    task: str,
    predictions: list[str],
    references: list[str],
    prompts: list[str] | None = None,
    k: int = 5,
) -> list[dict]:
    """The k worst examples of a task, worst first, as dicts {task, prompt, prediction, reference,
    score} (the shape `components.report.html_report` takes)."""
    scores = per_example_scores(task, predictions, references, prompts)
    lower_better = not higher_is_better(PRIMARY_METRIC[task_kind(task)])
    order = sorted(range(len(scores)), key=lambda i: -scores[i] if lower_better else scores[i])
    return [
        {
            "task": task,
            "prompt": prompts[i] if prompts is not None else "",
            "prediction": predictions[i],
            "reference": references[i],
            "score": scores[i],
        }
        for i in order[:k]
    ]


def aggregate(
    results: Mapping[str, Mapping[str, float]], counts: Mapping[str, int] | None = None
) -> dict[str, float]:
    """Overall metrics from per-task ones: each metric is the mean over the tasks that report it,
    weighted by `counts[task]` (number of examples; equal weights when `counts` is None). With
    `score_task`'s names this gives mcq_accuracy over `*_mcq` tasks, wer/cer over ASR tasks,
    bleu over translation and vqa_accuracy over open-ended tasks. WER weighted by utterances
    approximates the pooled corpus WER (which weights by reference words)."""
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
