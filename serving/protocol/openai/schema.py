"""The chat-completions request, in the shapes OpenAI and vLLM accept (see `routes` for the route)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, field_validator

from model.config import Strict


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; images are always resized the same way


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Strict):
    data: str  # base64 (a data URI is accepted too)
    format: str = "wav"  # informational: ffmpeg sniffs the real format


class InputAudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class MediaURL(Strict):
    url: str


class AudioURLPart(Strict):
    type: Literal["audio_url"]
    audio_url: MediaURL


class VideoURLPart(Strict):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[
    TextPart | ImagePart | InputAudioPart | AudioURLPart | VideoURLPart, Field(discriminator="type")
]
CONTENT_PART = TypeAdapter(ContentPart)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    # A string or raw parts; parts are validated one by one so errors can name messages[i].content[j].
    content: Any
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _string_or_parts(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, dict) for p in value)):
            return value
        raise ValueError("must be a string or a list of content parts (objects with a 'type')")


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str | None = None  # None: the served model
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
