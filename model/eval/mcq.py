"""Multiple choice: the option letter pulled out of free-form answers ("The answer is (B)", "答案是B",
"B. because ...", a bare "b"), with the option *text* as a fallback ("red circle" when option A is
"red circle"), and accuracy over letters."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

from model.eval.answers import check_pairs, normalize_answer

# Single letters that are also English words ("A red circle", "I think"): only taken as an answer
# when the context says so.
_WORD_LETTERS = frozenset("AI")
# "A is correct", "A or B": these words after a word-letter mean it names an option.
_OPTION_FOLLOWERS = frozenset("is was seems looks matches fits appears would should must and or nor".split())
_OPEN = "([【「"
_CLOSE = ")]）】」"


def _clean(text: str) -> str:
    # NFKC folds full-width letters and brackets ("（Ｂ）" -> "(B)"); markdown emphasis is noise.
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"[*`#]+", "", text).strip()


def _letter_classes(options: str) -> tuple[str, str]:
    letters = "".join(dict.fromkeys(c.upper() for c in options if c.isalpha()))
    if not letters:
        raise ValueError("options must contain at least one letter")
    return f"[{letters}]", f"[{letters.lower()}]"


def _token(up: str, lo: str) -> str:
    """Regex for one option letter as an answer: "(B)", "B" as its own word, or a lowercase
    letter that is bracketed or ends a clause ("answer: b" but not "answer is a red circle")."""
    o, c = re.escape(_OPEN), re.escape(_CLOSE)
    return (
        rf"(?:[{o}]\s*(?P<l1>{up}|{lo})\s*[{c}]"
        rf"|(?<![A-Za-z0-9])(?P<l2>{up})(?![A-Za-z0-9'’])"
        rf"|(?<![A-Za-z0-9])(?P<l3>{lo})(?=\s*(?:[{c}.:;,!。，；：！]|$)))"
    )


def _letter(m: re.Match[str]) -> str:
    return (m.group("l1") or m.group("l2") or m.group("l3")).upper()


def _names_another_option(text: str, end: int, up: str) -> bool:
    """'B or C', 'B and C', 'B/C': the statement does not pick one option."""
    after = text[end:]
    return (
        re.match(rf"\s*[)\]）】]?\s*(?:or|and|/|,|、|或|和|与)\s*[(\[]?\s*{up}(?![A-Za-z0-9])", after)
        is not None
    )


def _last_statement(patterns: Iterable[str], text: str, up: str) -> str | None:
    """Letter of the last (by position) unambiguous match of any pattern: in reasoning traces the
    final statement is the conclusion ("... so the answer is B")."""
    best: tuple[int, str] | None = None
    for pattern in patterns:
        # no global IGNORECASE: the letter token's case rules matter ("answer is a red circle");
        # keywords are case-insensitive through (?i:...) groups
        for m in re.finditer(pattern, text, flags=re.MULTILINE):
            if _names_another_option(text, m.end(), up):
                continue
            if best is None or m.start() >= best[0]:
                best = (m.start(), _letter(m))
    return best[1] if best else None


def extract_option_letter(text: str, options: str = "ABCD") -> str | None:
    """The option letter a free-form answer picks, or None when it names none or several.

    Precedence (first tier that decides wins):
      1. the whole answer is a letter: "B", "b", "(B)", "B.", "[b]";
      2. an explicit answer statement, the last one in the text: "The answer is (B)",
         "Answer: C) blue", "答案是B", "final answer: b";
      3. a weaker statement, the last one: "I choose B", "B is correct", "选B", "B正确";
      4. the first line starts with a letter and a delimiter ("B. because ...", "C) blue",
         "B\\nreasoning") unless lines enumerate several options; else the first line that is
         only a letter;
      5. exactly one bracketed letter anywhere: "... so (C)";
      6. exactly one upper-case letter standing alone anywhere, where "A" or "I" followed by a
         lower-case word is an article/pronoun ("A red circle" -> None, "A is right" -> A).
    Letters outside `options` are ignored.
    """
    s = _clean(text)
    if not s:
        return None
    up, lo = _letter_classes(options)
    for tier in (_tier_bare, _tier_statements, _tier_leading, _tier_bracketed, _tier_standalone):
        decided, letter = tier(s, up, lo)
        if decided:
            return letter
    return None


Verdict = tuple[bool, str | None]  # (this tier decides, the letter it decided on: None = no single answer)
_UNDECIDED: Verdict = (False, None)


def _bare_pattern(up: str, lo: str) -> re.Pattern[str]:
    o, c = re.escape(_OPEN), re.escape(_CLOSE)
    return re.compile(rf"^[{o}]?\s*({up}|{lo})\s*[{c}]?\s*[.:。：]?$")


def _tier_bare(s: str, up: str, lo: str) -> Verdict:
    """1. The whole answer is a letter."""
    m = _bare_pattern(up, lo).match(s)
    return (True, m.group(1).upper()) if m else _UNDECIDED


def _tier_statements(s: str, up: str, lo: str) -> Verdict:
    """2./3. The last explicit answer statement, else the last weaker one."""
    tok = _token(up, lo)
    answer_patterns = [
        rf"(?<![A-Za-z])(?i:answer(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be))?)"
        rf"\s*[:：=\-]?\s*(?i:(?:option|choice)\s*)?{tok}",
        rf"答案\s*(?:应该|应|应当)?\s*(?:是|为|选)?\s*[:：]?\s*(?:选项)?\s*{tok}",
    ]
    choice_patterns = [
        rf"(?i:\b(?:choose|chose|pick|select|go\s+with|opt\s+for))\s+(?i:(?:option|choice|answer)\s+)?{tok}",
        rf"(?i:(?:correct|right|best)\s+(?:option|choice)\s+(?:is|would\s+be)?)\s*[:：]?\s*{tok}",
        rf"(?<!\w){tok}\s*(?i:is|would\s+be|seems)\s+(?i:(?:the\s+)?(?:correct|right|best|answer))",
        rf"选(?:择)?\s*{tok}",
        rf"{tok}\s*(?:选项)?\s*(?:是)?\s*(?:正确|对的)",
        rf"正确(?:答案|选项|的)\s*(?:是|为)?\s*[:：]?\s*{tok}",
    ]
    for patterns in (answer_patterns, choice_patterns):
        letter = _last_statement(patterns, s, up)
        if letter:
            return True, letter
    return _UNDECIDED


def _tier_leading(s: str, up: str, lo: str) -> Verdict:
    """4. The first line leads with a letter (unless lines enumerate options), or a line is only a letter."""
    o, c = re.escape(_OPEN), re.escape(_CLOSE)
    lines = [ln.strip() for ln in s.splitlines() if ln.strip()]
    marker = re.compile(rf"^[{o}]?\s*({up}|{lo})\s*(?:[{c}.:：、,，]|$)")
    enumerated = {m.group(1).upper() for ln in lines if (m := marker.match(ln)) and len(ln) > 2}
    if len(enumerated) > 1:
        return _UNDECIDED
    m = marker.match(lines[0])
    if m and not _names_another_option(lines[0], m.end(1), up):
        return True, m.group(1).upper()
    m = re.match(rf"^({up})\s+\S", lines[0])
    if m and m.group(1) not in _WORD_LETTERS and not _names_another_option(lines[0], m.end(1), up):
        return True, m.group(1)
    bare = _bare_pattern(up, lo)
    for ln in lines:
        m = bare.match(ln)
        if m:
            return True, m.group(1).upper()
    return _UNDECIDED


def _tier_bracketed(s: str, up: str, lo: str) -> Verdict:
    """5. Exactly one bracketed letter anywhere (several: no single answer)."""
    o, c = re.escape(_OPEN), re.escape(_CLOSE)
    bracketed = {x.upper() for x in re.findall(rf"[{o}]\s*({up}|{lo})\s*[{c}]", s)}
    if len(bracketed) == 1:
        return True, bracketed.pop()
    return (True, None) if bracketed else _UNDECIDED


def _tier_standalone(s: str, up: str, lo: str) -> Verdict:
    """6. Exactly one capital letter standing alone ("A"/"I" before a lower-case word is a word)."""
    found = set()
    for m in re.finditer(rf"(?<![A-Za-z0-9])({up})(?![A-Za-z0-9'’])", s):
        letter = m.group(1)
        if letter in _WORD_LETTERS:
            nxt = re.match(r"\s+([a-z]+)", s[m.end() :])
            if nxt and nxt.group(1) not in _OPTION_FOLLOWERS:
                continue
        if re.search(r"(?:\bnot|n't|不是)\s*$", s[: m.start()], flags=re.IGNORECASE):
            continue  # "the answer is not A" rules A out
        found.add(letter)
    return True, (found.pop() if len(found) == 1 else None)


def parse_choices(question: str) -> dict[str, str]:
    """Options listed in a prompt, one per line ("A. red\\nB. green") or inline
    ("... A. red B. green C. blue"); markers "A.", "A)", "(A)", "A:", "A、". Returns {} when fewer
    than two consecutive options (A, B, ...) are found."""
    q = unicodedata.normalize("NFKC", question)
    markers = [
        (m.start(), m.end(), m.group(1) or m.group(2))
        for m in re.finditer(r"(?<![A-Za-z0-9])(?:\(([A-Z])\)|([A-Z])[.):：、])\s*", q)
    ]
    # The longest run A, B, C... in order; ties go to the later run (options follow the question).
    best: list[tuple[int, int, str]] = []
    for i, (_, _, letter) in enumerate(markers):
        if letter != "A":
            continue
        run = [markers[i]]
        for mk in markers[i + 1 :]:
            if mk[2] == chr(ord(run[-1][2]) + 1):
                run.append(mk)
        if len(run) >= len(best):
            best = run
    if len(best) < 2:
        return {}
    choices = {}
    for k, (_, end, letter) in enumerate(best):
        stop = best[k + 1][0] if k + 1 < len(best) else len(q)
        # an option never spans lines: what follows the last one is usually an instruction
        choices[letter] = q[end:stop].split("\n")[0].strip()
    return choices


def option_letter_from_text(text: str, choices: Mapping[str, str]) -> str | None:
    """The option whose text the answer gives ("a red circle" -> the letter of "red circle").

    Exact match after `normalize_answer` first; otherwise the single option whose text occurs as
    whole words (options contained in a longer matching option, like "red" in "dark red", yield
    to it). None when nothing or several options match."""
    answer = normalize_answer(text)
    if not answer:
        return None
    norm = {letter: normalize_answer(t) for letter, t in choices.items()}
    norm = {k: v for k, v in norm.items() if v}
    exact = [k for k, v in norm.items() if v == answer]
    if len(exact) == 1:
        return exact[0]
    hits = {k: v for k, v in norm.items() if _contains_words(answer, v)}
    hits = {k: v for k, v in hits.items() if not any(v != w and _contains_words(w, v) for w in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


def _contains_words(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", text) is not None


def mcq_correct(prediction: str, reference: str, prompt: str | None) -> float:
    choices = parse_choices(prompt) if prompt else {}
    gold = extract_option_letter(reference, "ABCDEFGHIJ") or reference.strip().upper()
    # Valid letters: the prompt's options, else A-D; widened to the key (MVBench and AGIEval have
    # five options), so a key of "E" is reachable.
    options = "".join(choices) or "ABCD"
    if len(gold) == 1 and gold not in options:
        options = "".join(chr(c) for c in range(ord("A"), max(ord(gold), ord(options[-1])) + 1))
    picked = extract_option_letter(prediction, options)
    if picked is None and choices:
        picked = option_letter_from_text(prediction, choices)
    return float(picked == gold)


def mcq_accuracy(
    predictions: Sequence[str], references: Sequence[str], prompts: Sequence[str] | None = None
) -> float:
    """Share of predictions whose extracted letter equals the reference letter. With prompts, the
    listed options bound the valid letters and give the option-text fallback."""
    check_pairs(predictions, references, prompts)
    ps = prompts if prompts is not None else [None] * len(references)
    return sum(map(mcq_correct, predictions, references, ps)) / len(references)


def pick_option(prediction: str, choices: Mapping[str, str]) -> str | None:
    """The option a free-form answer picks: its letter (`extract_option_letter`, bounded by the
    options' letters), else the option whose text it gives. None when it picks none or several."""
    letters = "".join(choices) or "ABCD"
    return extract_option_letter(prediction, letters) or (option_letter_from_text(prediction, choices)
                                                         if choices else None)


def gold_letter(answer: str, choices: Mapping[str, str]) -> str:
    """The key as a letter: "B", "(B)", or the text of an option (MVBench keys by the option's text)."""
    key = answer.strip()
    if len(key) == 1 and key.upper() in (choices or {key.upper(): ""}):
        return key.upper()
    for letter, text in choices.items():
        if normalize_answer(text) == normalize_answer(key):
            return letter
    return extract_option_letter(key, "".join(choices) or "ABCDEFGHIJ") or key.upper()


def rotations(choices: Mapping[str, str], gold: str) -> list[tuple[dict[str, str], str]]:
    """CircularEval (MMBench): the N rotations of the options' texts over the same letters, each with
    where the key moved. Rotation 0 is the original."""
    letters = list(choices)
    texts = [choices[k] for k in letters]
    at = letters.index(gold)
    n = len(letters)
    return [({letters[i]: texts[(i + k) % n] for i in range(n)}, letters[(at - k) % n]) for k in range(n)]
