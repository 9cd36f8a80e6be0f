"""What every protocol's request becomes before the model sees it: conversations with media tags and
the still-encoded media, and the client errors found on the way (`BadRequest`: a 400 naming the field).

The v2/v1 tensors (`serving.protocol.v2`) and the OpenAI messages (`serving.protocol.openai`) both
build `Conversation`s; `OmniPredictor.preprocess` decodes their media and tokenises them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import kserve


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


def decode_base64(text: str, field: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{field}: invalid base64 ({e})", field) from e
    if not data:
        raise BadRequest(f"{field}: empty media", field)
    return data
