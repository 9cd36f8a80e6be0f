"""OpenAI chat-completions requests -> the predictor's `GenerateRequest`: the JSON body checked
against the schema, the messages as one conversation (content parts become <image>/<audio>/<video>
tags in the order they appear, the media decoded from inline base64 or data URIs), and the sampling
settings checked against this model and server. Every mistake is a `BadRequest` naming the field."""

from __future__ import annotations

import json

from pydantic import ValidationError

from model.media.tags import TAG_PATTERN
from model.nn.sampling import SamplingParams
from serving.conversation import BadRequest, Conversation, GenerateRequest, MediaItem, decode_base64, decode_data_uri
from serving.predictor import OmniPredictor
from serving.protocol.openai.schema import (
    CONTENT_PART,
    AudioURLPart,
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
    TextPart,
    VideoURLPart,
)


def generate_request(req: ChatCompletionRequest, predictor: OmniPredictor) -> GenerateRequest:
    """The request's one conversation and how to sample its answer (the route formats the reply)."""
    return GenerateRequest([to_conversation(req.messages)], sampling_params(req, predictor))


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON ({e})") from e
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        param = _loc(err["loc"]) or None
        raise BadRequest(f"{param}: {err['msg']}" if param else err["msg"], param) from e


def sampling_params(req: ChatCompletionRequest, predictor: OmniPredictor) -> SamplingParams:
    """The request's sampling settings, checked against this model and server."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = predictor.max_new_tokens(req.max_completion_tokens or req.max_tokens, param)
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
    vocab = predictor.vocab_size
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    if any(k >= vocab for k in bias):
        raise BadRequest(f"logit_bias: token ids must be below the vocabulary size {vocab}", "logit_bias")
    temperature = predictor.cfg.default_temperature if req.temperature is None else req.temperature
    return SamplingParams(
        max_new_tokens=max_new, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0), seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias, stop=tuple(req.stop or ()),
        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0)


# --------------------------------------------------------------------------------- messages
def _no_tags(text: str, field: str) -> None:
    # The tokenizer would read a literal tag as a media slot: media must come as content parts.
    found = TAG_PATTERN.search(text)
    if found:
        raise BadRequest(
            f"{field}: literal {found.group(0)} in text; send media as content parts instead", field
        )


def _part(raw: dict, field: str):
    try:
        return CONTENT_PART.validate_python(raw)
    except ValidationError as e:
        err = e.errors()[0]
        # The first location item of a tagged union is the tag itself, e.g. ("image_url", "image_url", "url").
        where = field + _loc(err["loc"][1:], leading_dot=True)
        raise BadRequest(f"{where}: {err['msg']}", where) from e


def _media(part, field: str) -> MediaItem:
    if isinstance(part, ImagePart):
        where = f"{field}.image_url.url"
        return MediaItem("image", decode_data_uri(part.image_url.url, where), where)
    if isinstance(part, VideoURLPart):
        where = f"{field}.video_url.url"
        return MediaItem("video", decode_data_uri(part.video_url.url, where), where, part.video_url.use_audio_in_video)
    if isinstance(part, AudioURLPart):
        where = f"{field}.audio_url.url"
        return MediaItem("audio", decode_data_uri(part.audio_url.url, where), where)
    where = f"{field}.input_audio.data"
    data = part.input_audio.data
    raw = decode_data_uri(data, where) if data.startswith("data:") else decode_base64(data, where)
    return MediaItem("audio", raw, where)


def to_conversation(messages: list[ChatMessage]) -> Conversation:
    """OpenAI messages -> messages with tags in part order, plus the (still encoded) media."""
    out, media = [], []
    for i, msg in enumerate(messages):
        field = f"messages[{i}].content"
        if isinstance(msg.content, str):
            _no_tags(msg.content, field)
            content = msg.content
        else:
            content, previous_text = "", False
            for j, raw in enumerate(msg.content):
                part = _part(raw, f"{field}[{j}]")
                if isinstance(part, TextPart):
                    _no_tags(part.text, f"{field}[{j}].text")
                    content += ("\n" if previous_text else "") + part.text
                    previous_text = True
                else:
                    item = _media(part, f"{field}[{j}]")
                    media.append(item)
                    content += f"<{item.kind}>"
                    previous_text = False
        out.append({"role": "system" if msg.role == "developer" else msg.role, "content": content})
    return Conversation(out, media, "messages")


def _loc(loc: tuple, leading_dot: bool = False) -> str:
    text = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc)
    return text if leading_dot else text.lstrip(".")
