"""Open-ended answers: VQA-style normalisation and exact match, and the pairing check every metric runs."""

from __future__ import annotations

import re
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


# --------------------------------------------------------------------------- VQA accuracy (EvalAI)
# The official VQA / EvalAI answer processing, which lmms-eval (TextVQA, VQAv2) and VLMEvalKit apply
# to the prediction and to each of the ten human answers before counting matches.

# Contracted forms the official list restores when written without the apostrophe ("dont" -> "don't").
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
).split()
_CONTRACTIONS = {w.replace("'", ""): w for w in _CONTRACTED}
# Half-apostrophe spellings the official list also maps ("couldnt've", "he'dve").
_CONTRACTIONS |= {w.replace("'", "", 1): w for w in _CONTRACTED if w.count("'") == 2}
_CONTRACTIONS |= {w[::-1].replace("'", "", 1)[::-1]: w for w in _CONTRACTED if w.count("'") == 2}
_VQA_NUMBERS = {"none": "0", **{w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine "
                                                                 "ten".split())}}
_VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as published: removes a period not followed by a digit
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")


def vqa_normalize(answer: str) -> str:
    """EvalAI's answer processing: lowercase, drop , and ?, punctuation removed (or spaced when it
    separates words), periods not before a digit removed, number words zero-ten as digits, articles
    dropped, contractions restored ("dont" -> "don't")."""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in _VQA_PUNCT:
        glued = (p + " " in s or " " + p in s) or _DIGIT_COMMA.search(s) is not None
        out = out.replace(p, "" if glued else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy over the human answers (TextVQA/VQAv2: ten): for each answer, min(1, matches
    among the *other* answers / 3), averaged — so 3 matching humans of 10 give 0.9, 4 or more 1.0."""
    if not answers:
        raise ValueError("vqa_accuracy needs the list of human answers")
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(a) for a in answers]
    hits = [r == pred for r in refs]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(refs)


# ------------------------------------------------------------------------------- ANLS (DocVQA)


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA/InfographicVQA, as lmms-eval
    scores it): 1 - edit distance / the longer string's length, on lowercased, whitespace-collapsed
    text, best over the answers; below `threshold` it is 0."""
    from rapidfuzz.distance import Levenshtein

    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        length = max(len(answer), len(prediction))  # the published script measures the raw strings
        gold = " ".join(answer.strip().lower().split())
        distances.append(Levenshtein.distance(gold, pred) / length if length else 0.0)
    score = 1.0 - min(distances) if distances else 0.0
    return score if score >= threshold else 0.0


# ----------------------------------------------------------------------- relaxed accuracy (ChartQA)


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, answer: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy (Methani et al. 2020): a number within 5% of a non-zero gold number
    ("12%" reads as 0.12), anything else an exact case-insensitive match."""
    pred, gold = _to_float(prediction), _to_float(answer)
    if pred is not None and gold:
        return abs(pred - gold) / abs(gold) <= tolerance
    return prediction.lower() == answer.lower()


# ------------------------------------------------------------------------- containment (OCRBench)


def ocrbench_match(prediction: str, answers: Sequence[str], compact: bool = False) -> float:
    """OCRBench: 1 when any answer occurs in the prediction (lowercased, newlines as spaces). `compact`
    (its handwritten-formula subset, HME100k) compares with all spaces removed and case kept."""
    def clean(text: str) -> str:
        text = text.strip().replace("\n", " ")
        return text.replace(" ", "") if compact else text.lower()

    pred = clean(prediction)
    return float(any(clean(a) in pred for a in answers))
