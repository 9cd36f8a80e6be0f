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


class VideoURL(MediaURL):
    # The model's video.use_audio_in_video when absent (as Qwen-Omni's USE_AUDIO_IN_VIDEO, per video).
    use_audio_in_video: bool | None = Field(None, description="feed the video's sound track with its frames")


class VideoURLPart(Strict):
    type: Literal["video_url"]
    video_url: VideoURL


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
    include_obfuscation: bool | None = None  # accepted; chunks carry no obfuscation padding


class ResponseFormat(Strict):
    # json_object / json_schema would need constrained decoding, which this server does not do.
    type: Literal["text"]


# Fields OpenAI defines that change nothing here; accepted so clients that send them work (README).
IGNORED_FIELDS = ("user", "metadata", "store", "parallel_tool_calls", "service_tier", "prompt_cache_key",
                  "safety_identifier", "modalities")


class ChatCompletionRequest(Strict):
    model: str | None = None  # None: the served model
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted and ignored (IGNORED_FIELDS).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[Literal["text"]] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("at most 4 stop strings, none empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be between -100 and 100, got {bias}")
        return value
