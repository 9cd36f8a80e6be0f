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

import logging
import random
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.conversation import BadRequest
from serving.predictor import RETRY_AFTER_S, ClientGone, DeadlineExceeded, OmniPredictor, Overloaded
from serving.protocol.openai.request import generate_request, parse_request
from serving.protocol.openai.response import Reply, error_response

logger = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


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


def _overloaded(e: Exception, status: int, code: str) -> JSONResponse:
    response = error_response(status, str(e), None, code)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def completion_id() -> str:
    """A unique, opaque completion id. From Python's own generator (seeded from the OS, reseeded in a
    forked worker), not `uuid4`: its read of the OS's random source on the event loop hands the GIL
    to the engine thread, and getting it back costs up to a switch interval per request."""
    return f"chatcmpl-{random.getrandbits(128):032x}"


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
            chat = generate_request(req, predictor)
            reply = Reply(predictor, completion_id(), int(time.time()))
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


