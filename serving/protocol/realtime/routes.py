"""`/v1/realtime`: OpenAI's Realtime API over a WebSocket, text output.

    ws://HOST/v1/realtime[?model=omni]     Authorization: Bearer <token> (when the server has one)

The session starts with `session.created`. Client events: `session.update` (instructions,
`audio.input.format` PCM16 at any `rate` from 8 to 48 kHz, `audio.input.turn_detection` server_vad
or null, `max_output_tokens`), `input_audio_buffer.append` / `commit` / `clear`,
`conversation.item.create` (user text, PCM16 audio and data-URI images; assistant and system text),
`response.create`, `response.cancel`. With server_vad (the default) the server detects speech
(`input_audio_buffer.speech_started` / `speech_stopped`), commits the utterance as a user turn and
answers it; speech during an answer cancels it (barge-in). Answers stream as
`response.output_text.delta` events and end with `response.done`.

Every client mistake and every limit (the serving config's `realtime` section: session length,
buffered audio, event size, events per second) is an `error` event naming it, and the session goes
on; only the session length ends it, with a close frame saying so. A wrong or missing token is
refused before the WebSocket opens (HTTP 401).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from serving.auth import bearer_token_matches
from serving.conversation import BadRequest
from serving.predictor import OmniPredictor
from serving.protocol.realtime.events import CLIENT_EVENT, CLIENT_EVENT_TYPES
from serving.protocol.realtime.session import RealtimeSession, SessionError

logger = logging.getLogger(__name__)
SESSION_ENDED = 1000  # a normal closure: the session's time is up


class EventRate:
    """A token bucket: `rate` events a second, bursts of as many."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.last = rate, rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


async def _deny(ws: WebSocket, status: int, message: str, headers: dict | None = None) -> None:
    """Refuse the handshake with an HTTP status (close code 1008 where the server cannot send one)."""
    try:
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status, headers=headers))
    except RuntimeError:
        await ws.close(code=1008, reason=message[:120])


def build_router(predictor: OmniPredictor, token: str | None) -> APIRouter:
    router = APIRouter(tags=["Realtime"])

    @router.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        if token and not bearer_token_matches(ws.headers.get("authorization", ""), token):
            return await _deny(ws, 401, "missing or invalid bearer token", {"WWW-Authenticate": 'Bearer realm="omni"'})
        if ws.query_params.get("model", predictor.name) != predictor.name:
            return await _deny(ws, 404, f"this server serves {predictor.name!r}")
        if not predictor.ready:
            return await _deny(ws, 503, "the model is still loading", {"Retry-After": "1"})
        await ws.accept()
        await Connection(ws, predictor).run()

    return router


class Connection:
    """One WebSocket: frames in -> checked client events -> the session; its events out, one at a time."""

    def __init__(self, ws: WebSocket, predictor: OmniPredictor):
        self.ws, self.limits = ws, predictor.cfg.realtime
        self.lock = asyncio.Lock()  # the receive loop and the answer in progress both send
        self.session = RealtimeSession(predictor, self.send, self.limits)
        self.rate = EventRate(self.limits.max_events_per_s)

    async def send(self, event: dict) -> None:
        async with self.lock:
            await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    async def error(self, message: str, code: str, param: str | None = None, event_id: str | None = None,
                    kind: str = "invalid_request_error") -> None:
        await self.send(self.session.events.error(message, code, param, event_id, kind))

    async def run(self) -> None:
        deadline = time.monotonic() + self.limits.max_session_s
        try:
            await self.session.start()
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), deadline - time.monotonic())
                except TimeoutError:
                    return await self._expire()
                if message["type"] == "websocket.disconnect":
                    return
                await self.on_frame(message.get("text"), message.get("bytes"))
        except WebSocketDisconnect:
            pass
        finally:
            await self.session.close()

    async def _expire(self) -> None:
        limit = self.limits.max_session_s
        reason = f"session length limit of {limit:g} s reached (realtime.max_session_s)"
        await self.error(reason, "max_session_s")
        await self.session.close()
        await self.ws.close(code=SESSION_ENDED, reason=reason)

    async def on_frame(self, text: str | None, data: bytes | None) -> None:
        if not self.rate.take():
            return await self.error(f"more than {self.limits.max_events_per_s:g} events per second "
                                    "(realtime.max_events_per_s); the event was dropped", "max_events_per_s")
        if text is None:
            return await self.error("binary frames are not accepted: send JSON events as text frames",
                                    "invalid_event")
        if len(text.encode()) > self.limits.max_event_bytes:
            return await self.error(f"event exceeds {self.limits.max_event_bytes} bytes (realtime.max_event_bytes); "
                                    "send audio in smaller chunks", "max_event_bytes")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            return await self.error(f"the event is not valid JSON ({e})", "invalid_json")
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            return await self.error("an event must be a JSON object with a string 'type'", "invalid_event", "type")
        await self.on_event(raw)

    async def on_event(self, raw: dict) -> None:
        kind, event_id = raw["type"], raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
        if kind not in CLIENT_EVENT_TYPES:
            return await self.error(f"unknown event type {kind!r}; this server takes {', '.join(CLIENT_EVENT_TYPES)}",
                                    "unknown_event_type", "type", event_id)
        try:
            await self.session.handle(CLIENT_EVENT.validate_python(raw))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"][1:])  # the first item is the event type (the tag)
            message = f"{where}: {err['msg']}" if where else err["msg"]
            await self.error(message, "invalid_value", where or None, event_id)
        except BadRequest as e:
            await self.error(e.reason, "invalid_value", e.param, event_id)
        except SessionError as e:
            await self.error(e.message, e.code, e.param, event_id)
        except WebSocketDisconnect:
            raise
        except Exception:
            logger.exception("realtime event %s failed", kind)
            await self.error("internal error; see the server log", "server_error", None, event_id, "server_error")
