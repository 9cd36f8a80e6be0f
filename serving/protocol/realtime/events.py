"""The Realtime API's events as this server speaks them (OpenAI's GA names: `response.output_text.delta`,
`session.audio.input.turn_detection`, ...): the client events checked by pydantic, the server events
built by `ServerEvents`. Text output only; the fields that would change nothing here are refused
rather than silently ignored, except the few named in `IGNORED_SESSION_FIELDS`."""

from __future__ import annotations

import itertools
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from model.config import Strict

# ----------------------------------------------------------------------------- client events
MIN_RATE, MAX_RATE = 8000, 48000


class AudioFormat(Strict):
    type: Literal["audio/pcm"] = "audio/pcm"  # PCM16 little-endian mono; G.711 (pcmu/pcma) is not taken
    # OpenAI fixes 24000; any rate in range is taken here and resampled as the model needs.
    rate: int = Field(24000, ge=MIN_RATE, le=MAX_RATE)


class ServerVad(Strict):
    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, gt=0, lt=1)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=32, le=10000)
    create_response: bool = True  # end of speech ends the turn and asks for an answer
    interrupt_response: bool = True  # speech during an answer cancels it (barge-in)
    idle_timeout_ms: None = None  # not supported: must be absent or null


class AudioInput(Strict):
    format: AudioFormat = AudioFormat()
    # None turns detection off: the client commits the buffer itself.
    turn_detection: ServerVad | None = ServerVad()
    noise_reduction: None = None
    transcription: None = None


class AudioConfig(Strict):
    input: AudioInput = AudioInput()
    output: dict[str, Any] | None = None  # accepted (a voice, a format) and unused: the output is text


# Session fields OpenAI defines that change nothing here; accepted so that stock clients work.
IGNORED_SESSION_FIELDS = ("model", "tracing", "include", "prompt", "truncation", "tool_choice")


class Session(Strict):
    type: Literal["realtime"] = "realtime"
    instructions: str = ""
    output_modalities: list[Literal["text"]] = ["text"]
    audio: AudioConfig = AudioConfig()
    max_output_tokens: int | Literal["inf"] | None = None  # None or "inf": the server's default
    tools: list[dict] = Field(default_factory=list, max_length=0)  # no tool calling
    model: str | None = None
    tracing: Any = None
    include: Any = None
    prompt: Any = None
    truncation: Any = None
    tool_choice: Any = None


class SessionUpdate(Strict):
    type: Literal["session.update"]
    event_id: str | None = None
    session: Session


class AudioAppend(Strict):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str  # base64 PCM16 at the session's rate


class AudioCommit(Strict):
    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class AudioClear(Strict):
    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


class InputText(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputAudio(Strict):
    type: Literal["input_audio"]
    audio: str  # base64 PCM16 at the session's rate
    transcript: str | None = None


class InputImage(Strict):
    type: Literal["input_image"]
    image_url: str  # a data URI
    detail: Literal["auto", "low", "high"] | None = None


ItemContent = Annotated[InputText | InputAudio | InputImage, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = "message"
    id: str | None = None
    object: Literal["realtime.item"] | None = None
    status: str | None = None
    role: Literal["user", "assistant", "system"]
    content: list[ItemContent] = Field(min_length=1)


class ItemCreate(Strict):
    type: Literal["conversation.item.create"]
    event_id: str | None = None
    previous_item_id: str | None = None  # only appending at the end is supported: must be null or the last item
    item: MessageItem


class ResponseParams(Strict):
    instructions: str | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    output_modalities: list[Literal["text"]] | None = None
    conversation: Literal["auto"] | None = None
    metadata: dict[str, str] | None = None


class ResponseCreate(Strict):
    type: Literal["response.create"]
    event_id: str | None = None
    response: ResponseParams = ResponseParams()


class ResponseCancel(Strict):
    type: Literal["response.cancel"]
    event_id: str | None = None
    response_id: str | None = None


ClientEvent = Annotated[
    SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | ResponseCreate | ResponseCancel,
    Field(discriminator="type"),
]
CLIENT_EVENT = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                      "input_audio_buffer.clear", "conversation.item.create", "response.create", "response.cancel")


# ----------------------------------------------------------------------------- server events
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class ServerEvents:
    """Server events of one session, each with its own `event_id`."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def make(self, kind: str, **fields) -> dict:
        return {"type": kind, "event_id": f"event_{next(self._count)}", **fields}

    def error(self, message: str, code: str, param: str | None = None, event_id: str | None = None,
              kind: str = "invalid_request_error") -> dict:
        return self.make("error", error={"type": kind, "code": code, "message": message, "param": param,
                                         "event_id": event_id})


def session_object(session_id: str, session: Session, model: str) -> dict:
    body = session.model_dump(mode="json", exclude=set(IGNORED_SESSION_FIELDS) - {"model"})
    return {**body, "id": session_id, "object": "realtime.session", "model": model}


def message_item(item_id: str, role: str, content: list[dict], status: str = "completed") -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": status,
            "content": content}


def response_object(response_id: str, status: str, output: list[dict], reason: str | None = None,
                    usage: dict | None = None, error: dict | None = None) -> dict:
    details = None
    if status != "in_progress" and (reason or error or status != "completed"):
        details = {"type": status, "reason": reason, "error": error}
    return {"id": response_id, "object": "realtime.response", "status": status, "status_details": details,
            "output": output, "output_modalities": ["text"], "conversation_id": None, "usage": usage}
