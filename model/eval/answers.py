"""Open-ended answers: VQA-style normalisation and exact match, and the pairing check every metric runs."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def check_pairs(predictions: Sequence[str], references: Sequence[str], prompts: Sequence[str] | None) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if prompts is not None and len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")


_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str) -> str:
    """VQA-eval normalisation: lowercase, punctuation and symbols to spaces (keeping decimal
    points, dropping thousands separators and apostrophes), number words to digits, articles
    removed, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", text).lower().strip()
    out = []
    for i, ch in enumerate(s):
        if ch in "'’`":
            continue
        if ch in ".," and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit():
            if ch == ".":
                out.append(ch)
            continue
        out.append(" " if unicodedata.category(ch)[0] in "PS" else ch)
    words = [_NUMBER_WORDS.get(w, w) for w in "".join(out).split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the (or any) normalised reference."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in refs))
