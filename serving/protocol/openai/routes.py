"""OpenAI-style chat completions on the KServe server: `POST /openai/v1/chat/completions`.

KServe's own OpenAI routes need vLLM, so this is a small route of our own. Requests mirror the
shapes OpenAI and vLLM accept:

    {"model": "omni", "max_tokens": 32, "stream": false,
     "messages": [{"role": "user", "content": [
         {"type": "text", "text": "What is shown?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}},
         {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}},
         {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,...", "use_audio_in_video": true}}]}]}

Content parts become <image>/<audio>/<video> tags in the order they appear; a video's
`use_audio_in_video` (default: the model's `video.use_audio_in_video`) feeds its sound track too. Media must be inline
(base64 or data URIs): the server makes no outbound requests, so http(s) URLs get a 400 saying so.
Sampling follows OpenAI: `temperature` (default `default_temperature`, 1 like OpenAI; 0 is
greedy), `top_p`, `top_k`, `seed` (same seed, same answer, whatever else is batched with it),
`stop`, `presence_penalty` / `frequency_penalty`, `logit_bias`, `max_tokens` /
`max_completion_tokens`, `logprobs` + `top_logprobs`, `response_format` of type text, and
`stream_options.include_usage`. `n` must be 1. The fields in `schema.IGNORED_FIELDS` are accepted
and change nothing; any other field is refused, not ignored.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for malformed
JSON, schema violations, bad base64, undecodable media and exceeded limits; 404 for an unknown
model; 413 for a body over `limits.max_request_bytes`; 429 with Retry-After when the queue is full;
503 with Retry-After when a request misses its deadline (`limits.request_timeout_s`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import kserve
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from model.media.tags import TAG_PATTERN
from model.nn.engine import Event, Sequence
from model.nn.sampling import SamplingParams
from serving.conversation import BadRequest, Conversation, MediaItem, decode_base64
from serving.predictor import RETRY_AFTER_S, ChatRequest, ClientGone, DeadlineExceeded, OmniPredictor, Overloaded
from serving.protocol.openai.schema import (
    CONTENT_PART,
    AudioURLPart,
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
    TextPart,
    VideoURLPart,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- conversion
def _no_tags(text: str, field: str) -> None:
    # The tokenizer would read a literal tag as a media slot: media must come as content parts.
    found = TAG_PATTERN.search(text)
    if found:
        raise BadRequest(
            f"{field}: literal {found.group(0)} in text; send media as content parts instead", field
        )


def _data_uri(url: str, field: str) -> bytes:
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
        return MediaItem("image", _data_uri(part.image_url.url, where), where)
    if isinstance(part, VideoURLPart):
        where = f"{field}.video_url.url"
        return MediaItem("video", _data_uri(part.video_url.url, where), where, part.video_url.use_audio_in_video)
    if isinstance(part, AudioURLPart):
        where = f"{field}.audio_url.url"
        return MediaItem("audio", _data_uri(part.audio_url.url, where), where)
    where = f"{field}.input_audio.data"
    data = part.input_audio.data
    return MediaItem("audio", _data_uri(data, where) if data.startswith("data:") else decode_base64(data, where), where)


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


# ------------------------------------------------------------------------------------ helpers
class _TooLarge(Exception):
    pass


def _loc(loc: tuple, leading_dot: bool = False) -> str:
    text = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc)
    return text if leading_dot else text.lstrip(".")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


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


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sampling_params(req: ChatCompletionRequest, predictor: OmniPredictor) -> SamplingParams:
    """The request's sampling settings, checked against this model and server."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = predictor.max_new_tokens(req.max_completion_tokens or req.max_tokens, param)
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
    vocab = predictor.chat.model.llm.config.vocab_size
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    if any(k >= vocab for k in bias):
        raise BadRequest(f"logit_bias: token ids must be below the vocabulary size {vocab}", "logit_bias")
    temperature = predictor.cfg.default_temperature if req.temperature is None else req.temperature
    return SamplingParams(
        max_new_tokens=max_new, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0), seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias, stop=tuple(req.stop or ()),
        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0)


def _overloaded(e: Exception, status: int, code: str) -> JSONResponse:
    response = error_response(status, str(e), None, code)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


# -------------------------------------------------------------------------------------- route
def build_router(predictor: OmniPredictor) -> APIRouter:
    """`/openai/v1/chat/completions` and `/openai/v1/models` for one predictor."""
    router = APIRouter(prefix="/openai/v1", tags=["OpenAI"])
    started = int(time.time())

    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": predictor.name, "object": "model", "created": started, "owned_by": "omni-platform"}],
        }

    async def chat_completions(request: Request) -> Response:
        try:
            req = parse_request(await _read_body(request, predictor.cfg.limits.max_request_bytes))
            if req.model not in (None, predictor.name):
                return error_response(
                    404, f"the model {req.model!r} does not exist; this server serves {predictor.name!r}",
                    "model", "model_not_found",
                )
            chat = ChatRequest(to_conversation(req.messages), sampling_params(req, predictor))
            reply = Reply(predictor, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
            if req.stream:  # preprocess and queue before the headers go out: errors keep their status
                prepared = await predictor.preprocess(chat)
                seq, events = predictor.start_stream(prepared)
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                body = reply.events(predictor.stream(seq, events), seq, include_usage)
                return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            # KServe's own request phases (and their latency metrics): preprocess -> predict -> postprocess.
            [done], _ = await predictor(chat)
        except BadRequest as e:
            return error_response(400, e.reason, e.param)
        except _TooLarge:
            limit = predictor.cfg.limits.max_request_bytes
            return error_response(413, f"request body exceeds {limit} bytes", None, "request_too_large")
        except Overloaded as e:
            return _overloaded(e, 429, "queue_full")
        except DeadlineExceeded as e:
            return _overloaded(e, 503, "timeout")
        except ClientGone:
            return error_response(499, "the client closed the connection", None, "client_closed")
        except Exception:
            logger.exception("chat completion failed")
            return error_response(500, "internal error while generating; see the server log")
        return JSONResponse(reply.completion(done))

    router.add_api_route("/models", models, methods=["GET"])
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"], response_model=None)
    return router


class Reply:
    """The response objects of one chat completion: `chat.completion`, or its `chat.completion.chunk`s."""

    def __init__(self, predictor: OmniPredictor, rid: str, created: int):
        self.predictor, self.rid, self.created = predictor, rid, created

    def _logprobs(self, logprobs) -> dict | None:
        return None if logprobs is None else {"content": self.predictor.logprob_entries(logprobs), "refusal": None}

    def completion(self, done) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                  "logprobs": self._logprobs(done.logprobs), "finish_reason": done.finish_reason}
        return {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.predictor.name,
                "choices": [choice], "usage": _usage(done.prompt_tokens, done.completion_tokens)}

    def chunk(self, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.predictor.name, "choices": [choice]}

    async def events(self, events: AsyncIterator[Event], seq: Sequence, include_usage: bool) -> AsyncIterator[str]:
        """The role, content deltas (with their logprobs), the finish reason, optionally usage, then
        `[DONE]`. A failure after the headers went out can only be reported as an error event."""
        latency = kserve.metrics.PREDICT_HIST_TIME.labels(**kserve.metrics.get_labels(self.predictor.name))
        yield _sse(self.chunk({"role": "assistant", "content": ""}))
        started, leading = time.perf_counter(), True
        async for event in events:
            text = event.text.lstrip() if leading else event.text  # as the plain answer, which is stripped
            leading = leading and not text
            lps = [event.logprob] if event.logprob is not None and seq.params.logprobs else None
            if text or lps:
                yield _sse(self.chunk({"content": text}, logprobs=lps))
            if event.kind == "done" and event.finish_reason in ("timeout", "error", "cancelled"):
                logger.warning("streamed generation ended: %s", event.finish_reason)
                message = "the request missed the server's deadline" if event.finish_reason == "timeout" else \
                    "generation failed; see the server log"
                yield _sse({"error": {"message": message, "type": "server_error", "param": None,
                                      "code": event.finish_reason}})
                yield _sse("[DONE]")
                return
        latency.observe(time.perf_counter() - started)
        yield _sse(self.chunk({}, seq.finish_reason))
        if include_usage:
            yield _sse({**self.chunk({}), "choices": [], "usage": _usage(seq.prompt_tokens, seq.completion_tokens)})
        yield _sse("[DONE]")
