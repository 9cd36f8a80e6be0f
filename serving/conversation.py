"""What every protocol's request becomes before the model sees it, and what comes back: the
protocol-neutral types between `serving.protocol` and the predictor.

A protocol (the v2/v1 tensors in `serving.protocol.v2`, the OpenAI messages in
`serving.protocol.openai`) parses its request into a `GenerateRequest`: conversations with media
tags and the still-encoded media, the sampling settings, and `respond`, the protocol's own way of
formatting the `Completion`s back. `OmniPredictor` decodes the media, tokenises, generates and hands
the completions to `respond`, never knowing which protocol asked. Client errors found on the way
are `BadRequest`s (a 400 naming the field).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kserve

from model.nn.sampling import SamplingParams


class BadRequest(kserve.errors.InvalidInput):
    """A client error; `param` names the offending field (OpenAI's `error.param`)."""

    def __init__(self, reason: str, param: str | None = None):
        super().__init__(reason)
        self.param = param


@dataclass
class MediaItem:
    kind: str  # "image" | "video" | "audio"
    data: bytes
    field: str  # where it came from, for error messages
    use_audio_in_video: bool | None = None  # a video's: read its sound too; None: the model's default


@dataclass
class Conversation:
    """Messages with <image>/<video>/<audio> tags, plus the encoded media in tag order."""

    messages: list[dict]
    media: list[MediaItem] = field(default_factory=list)
    field: str = "messages"


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    logprobs: list | None = None  # model.nn.sampling.TokenLogprob per token, when asked for
    cached_tokens: int = 0  # prompt tokens whose keys and values the engine's prefix cache supplied


def _completions_as_they_are(completions: list[Completion]) -> list[Completion]:
    return completions


@dataclass
class GenerateRequest:
    """One request of any protocol: the conversations to answer (a v2 batch has one per row), how to
    sample the answers, and how the protocol formats the finished completions as its response."""

    conversations: list[Conversation]
    params: SamplingParams
    respond: Callable[[list[Completion]], Any] = _completions_as_they_are


def decode_base64(text: str, field: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{field}: invalid base64 ({e})", field) from e
    if not data:
        raise BadRequest(f"{field}: empty media", field)
    return data


def decode_data_uri(url: str, field: str) -> bytes:
    """A media part's URL -> its bytes: base64 data URIs only (the server fetches nothing)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise BadRequest(
            f"{field}: remote URLs are not fetched (this server makes no outbound requests); "
            "send the media inline as a data URI, e.g. data:image/png;base64,...",
            field,
        )
    if scheme != "data":
        raise BadRequest(f"{field}: expected a data URI (data:<mime type>;base64,<data>)", field)
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise BadRequest(f"{field}: only base64 data URIs are accepted (data:<mime type>;base64,<data>)", field)
    return decode_base64(payload, field)
