"""ASR and speech translation, normalised the way lmms-eval and Whisper's papers score them.

- English: Whisper's English normaliser (`whisper-normalizer`: contractions expanded, spelled-out
  numbers as digits, British spellings folded, fillers and bracketed annotations removed), so
  "I don't know" and "I do not know" are the same words.
- Chinese: traditional -> simplified (`zhconv`), Arabic numerals read out in Chinese (`cn2an`:
  "2012年" -> "二零一二年", "3个" -> "三个"), then Whisper's basic normaliser; scored per character
  (CER), as Chinese has no word boundaries.
- Other languages: Whisper's basic normaliser.

WER counts each CJK character as a word (so a Chinese WER is its CER, and mixed text is scored as
MER). Corpus rates pool the edits of every utterance over the pooled reference length.
BLEU is sacrebleu's corpus BLEU with the tokenizer of the target language ("zh" for Chinese,
"13a" otherwise); its signature says exactly how it was computed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import jiwer
import sacrebleu

from model.eval.answers import check_pairs

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
CJK_LANGS = ("zh", "ja", "yue", "cmn")


def is_cjk(lang: str | None) -> bool:
    return bool(lang) and lang.lower().split("-")[0].split("_")[0] in CJK_LANGS


@cache
def _english():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@cache
def _basic():
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalize_chinese(text: str) -> str:
    """Simplified script, numerals read out, punctuation gone, no spaces between CJK characters."""
    import cn2an
    import zhconv

    s = zhconv.convert(unicodedata.normalize("NFKC", text), "zh-cn")
    try:
        s = cn2an.transform(s, "an2cn")
    except (ValueError, KeyError):  # cn2an refuses some digit runs it cannot read; keep the text as is
        pass
    s = _basic()(s)
    return re.sub(rf"\s+(?=[{_CJK}])|(?<=[{_CJK}])\s+", "", s).strip()


def normalize_transcript(text: str, lang: str | None = None) -> str:
    """The normalised transcript both sides are compared on (see the module docstring). Without a
    language: Chinese when the text has CJK characters, else English."""
    if is_cjk(lang) or (lang is None and _CJK_RE.search(text)):
        return normalize_chinese(text)
    if lang is None or lang.lower().startswith("en"):
        return " ".join(_english()(text).split())
    return " ".join(_basic()(text).split())


def _tokens(text: str) -> list[str]:
    # CJK characters are tokens of their own; other runs split on spaces.
    return re.findall(rf"[{_CJK}]|[^\s{_CJK}]+", text)


@dataclass(frozen=True)
class Edits:
    """Edit operations of one utterance against its reference, and the reference length."""

    errors: int
    length: int

    @property
    def rate(self) -> float:
        return self.errors / self.length if self.length else float(self.errors > 0)


def word_edits(reference: str, hypothesis: str, lang: str | None = None) -> Edits:
    ref, hyp = _tokens(normalize_transcript(reference, lang)), _tokens(normalize_transcript(hypothesis, lang))
    return _edits([" ".join(ref)], [" ".join(hyp)], words=True) if ref else Edits(len(hyp), 0)


def char_edits(reference: str, hypothesis: str, lang: str | None = None) -> Edits:
    ref, hyp = normalize_transcript(reference, lang), normalize_transcript(hypothesis, lang)
    return _edits([ref], [hyp], words=False) if ref else Edits(len(hyp), 0)


def _edits(refs: list[str], hyps: list[str], words: bool) -> Edits:
    out = jiwer.process_words(refs, hyps) if words else jiwer.process_characters(refs, hyps)
    errors = out.substitutions + out.deletions + out.insertions
    return Edits(errors, out.hits + out.substitutions + out.deletions)


def corpus_rate(edits: Sequence[Edits]) -> float:
    """Pooled edits over pooled reference length (what jiwer and lmms-eval report for a corpus)."""
    length = sum(e.length for e in edits)
    errors = sum(e.errors for e in edits)
    return errors / length if length else float(errors > 0)


def wer(references: Sequence[str], hypotheses: Sequence[str], lang: str | None = None) -> float:
    """Corpus word error rate after the language's normaliser (CJK characters count as words)."""
    check_pairs(hypotheses, references, None)
    return corpus_rate([word_edits(r, h, lang) for r, h in zip(references, hypotheses, strict=True)])


def cer(references: Sequence[str], hypotheses: Sequence[str], lang: str | None = None) -> float:
    """Corpus character error rate after the language's normaliser; spaces next to CJK characters
    are not characters to score, spaces between Latin words are."""
    check_pairs(hypotheses, references, None)
    return corpus_rate([char_edits(r, h, lang) for r, h in zip(references, hypotheses, strict=True)])


def bleu_tokenizer(references: Sequence[str], lang: str | None) -> str:
    """"zh" for a Chinese (or Japanese) target, else sacrebleu's default "13a"; without a language,
    decided by whether the references contain CJK characters."""
    if lang is not None:
        return "zh" if is_cjk(lang) else "13a"
    return "zh" if any(_CJK_RE.search(r) for r in references) else "13a"


@dataclass(frozen=True)
class BleuScore:
    score: float
    signature: str  # e.g. nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0
    stderr: float | None = None


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], lang: str | None = None,
                bootstrap: int = 0) -> BleuScore:
    """Corpus BLEU (0-100) with sacrebleu; with `bootstrap` resamples, its standard error from
    sacrebleu's own (seeded) bootstrap: the 95% interval / 1.96."""
    check_pairs(hypotheses, references, None)
    metric = sacrebleu.BLEU(tokenize=bleu_tokenizer(references, lang))
    score = metric.corpus_score(list(hypotheses), [list(references)])
    signature = str(metric.get_signature())
    stderr = None
    if bootstrap > 1 and len(references) > 1:
        resampled = metric.corpus_score(list(hypotheses), [list(references)], n_bootstrap=bootstrap)
        stderr = float(resampled._ci) / 1.96
    return BleuScore(float(score.score), signature, stderr)


def bleu(references: Sequence[str], hypotheses: Sequence[str], tokenize: str | None = None,
         lang: str | None = None) -> float:
    """Corpus BLEU (0-100). `tokenize` forces a sacrebleu tokenizer; otherwise the target language's."""
    check_pairs(hypotheses, references, None)
    tok = tokenize or bleu_tokenizer(references, lang)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tok).score)


def sentence_bleu(reference: str, hypothesis: str, lang: str | None = None) -> float:
    return float(sacrebleu.sentence_bleu(hypothesis, [reference], tokenize=bleu_tokenizer([reference], lang)).score)
