"""The two shapes evaluation passes around: a benchmark item (what a reader yields and the runner
asks the model) and a scored row (an answer next to its key: what `omni eval score` reads, one JSON
object a line, and what the runner hands the metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field, field_validator

from model.config import Strict
from model.media.decode import Source


@dataclass
class BenchItem:
    """One question of a benchmark, as its reader found it. Media are paths/URIs or the bytes
    (VLMEvalKit TSVs carry base64 images)."""

    id: str
    question: str
    answers: list[str]  # the key(s): MCQ -> [letter], VQA -> the human answers, ASR -> [transcript]
    choices: dict[str, str] = field(default_factory=dict)  # MCQ options, letter -> text
    hint: str = ""
    images: list[Source] = field(default_factory=list)
    videos: list[Source] = field(default_factory=list)
    audios: list[Source] = field(default_factory=list)
    category: dict[str, str] = field(default_factory=dict)  # e.g. {"category": ..., "l2-category": ...}
    lang: str | None = None
    group: str | None = None  # CircularEval: the rotations of one question share a group

    def media_tags(self) -> str:
        return "<image>" * len(self.images) + "<video>" * len(self.videos) + "<audio>" * len(self.audios)


@dataclass(frozen=True)
class ReadFailure:
    """An item the reader could not use (no key, a missing media file, a broken row): reported, never dropped."""

    id: str
    reason: str


class ScoreRow(Strict):
    """One answer to score: `{"id": ..., "prediction": "...", "answers": ["..."], "choices": {"A": "..."}
    (MCQ only), "lang": "en"}`. Optional: `category` (field -> value, for breakdowns), `group`
    (CircularEval: rows sharing a group are rotations of one question, right only if all are), `failed`
    (why no prediction was made; the row is scored as an empty answer)."""

    id: str
    prediction: str = ""
    answers: list[str] = Field(min_length=1)
    choices: dict[str, str] | None = None
    lang: str | None = None
    category: dict[str, str] = Field(default_factory=dict)
    group: str | None = None
    failed: str | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, v: object) -> object:
        return str(v) if isinstance(v, int) else v

    @field_validator("answers", mode="before")
    @classmethod
    def _one_answer(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v
