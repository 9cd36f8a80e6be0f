"""ASR and speech translation: corpus WER/CER with `jiwer` after Whisper-style basic normalisation,
corpus BLEU with `sacrebleu` (`zh` tokenizer for Chinese targets)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import jiwer
import sacrebleu

from model.eval.answers import check_pairs

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")


def normalize_transcript(text: str) -> str:
    """Whisper's basic normaliser: lowercase, drop bracketed annotations ("[noise]", "(laughs)"),
    punctuation and symbols to spaces (apostrophes dropped: "don't" == "dont"), collapse spaces."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)
    s = re.sub(r"\(([^)]+?)\)", "", s)
    s = re.sub(r"['’`]", "", s)
    s = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in s)
    return " ".join(s.split())


def _normalize_chars(text: str) -> str:
    # Chinese/Japanese are written without spaces: spaces next to them are not characters to
    # score; between Latin words they still count.
    return re.sub(rf"\s+(?=[{_CJK}])|(?<=[{_CJK}])\s+", "", normalize_transcript(text))


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate (total edits / total reference words), Whisper-normalised."""
    check_pairs(hypotheses, references, None)
    refs = [normalize_transcript(r) for r in references]
    hyps = [normalize_transcript(h) for h in hypotheses]
    return float(jiwer.process_words(refs, hyps).wer)


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate, Whisper-normalised; spaces around CJK characters ignored."""
    check_pairs(hypotheses, references, None)
    refs = [_normalize_chars(r) for r in references]
    hyps = [_normalize_chars(h) for h in hypotheses]
    return float(jiwer.process_characters(refs, hyps).cer)


def bleu_tokenizer(references: Sequence[str], tokenize: str | None) -> str:
    if tokenize:
        return tokenize
    return "zh" if any(_CJK_RE.search(r) for r in references) else "13a"


def bleu(references: Sequence[str], hypotheses: Sequence[str], tokenize: str | None = None) -> float:
    """Corpus BLEU (0-100, sacrebleu). `tokenize=None` picks "zh" when the references contain
    CJK characters, else sacrebleu's default "13a"."""
    check_pairs(hypotheses, references, None)
    tok = bleu_tokenizer(references, tokenize)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tok).score)
