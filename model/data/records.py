"""The JSONL record format (the ms-swift / LLaMA-Factory convention) and its validation.

    {"id": "img-0001", "task": "image_mcq", "lang": "en", "source": "omni-tiny",
     "messages": [{"role": "user", "content": "<image>What color is the shape? A. red B. blue ..."},
                  {"role": "assistant", "content": "B"}],
     "images": ["media/img-0001.png"], "videos": [], "audios": []}

`<image>`, `<video>` and `<audio>` tags in message text match the media lists, in order.
`"use_audio_in_video": true` feeds the record's videos with their sound tracks (false: frames only;
absent: the model's `video.use_audio_in_video`).
Media are paths (relative to the JSONL file's folder, or absolute) or s3:// URIs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.config import Strict
from model.media.tags import MEDIA_TAGS, TAG_PATTERN, UNKNOWN_TAG_PATTERN


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class Record(Strict):
    id: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    videos: list[str] = Field(default_factory=list)
    audios: list[str] = Field(default_factory=list)
    use_audio_in_video: bool | None = Field(
        None, description="read the videos' sound tracks with their frames; null: the model's video.use_audio_in_video")
    task: str = "chat"
    lang: str = "en"
    source: str = "unknown"

    @model_validator(mode="after")
    def _tags_match_media(self) -> Record:
        if not any(m.role == "assistant" and m.content.strip() for m in self.messages):
            raise ValueError("record needs a non-empty assistant turn")
        for m in self.messages:
            bad = UNKNOWN_TAG_PATTERN.search(m.content)
            if bad:
                raise ValueError(f"unknown media tag {bad.group(0)!r}; use <image>, <video> or <audio>")
        tags = [t for m in self.messages for t in TAG_PATTERN.findall(m.content)]
        for kind in MEDIA_TAGS:
            n_tags, n_media = tags.count(kind), len(getattr(self, kind + "s"))
            if n_tags != n_media:
                raise ValueError(f"{n_tags} <{kind}> tag(s) in the text but {n_media} item(s) in `{kind}s`")
        return self

    def media_order(self) -> list[tuple[str, str]]:
        """(kind, uri) for every tag in the order the tags appear in the conversation."""
        counters = {k: 0 for k in MEDIA_TAGS}
        order = []
        for m in self.messages:
            for kind in TAG_PATTERN.findall(m.content):
                order.append((kind, getattr(self, kind + "s")[counters[kind]]))
                counters[kind] += 1
        return order

    @property
    def reference(self) -> str:
        """The last assistant turn: the target an evaluation compares against."""
        return [m.content for m in self.messages if m.role == "assistant"][-1]

    @property
    def prompt_messages(self) -> list[Message]:
        """The conversation up to (not including) the last assistant turn."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:last]
