"""`/v1/realtime`: OpenAI's Realtime API over a WebSocket, text output.

    ws://HOST/v1/realtime[?model=omni]     Authorization: Bearer <token> (when the server has one)

A browser, which cannot set headers on a WebSocket, sends the token as OpenAI's clients do, in the
subprotocols: `new WebSocket(url, ["realtime", "openai-insecure-api-key." + token])`; the server
answers with the subprotocol `realtime` (never echoing the key).

The session starts with `session.created`. Client events: `session.update` (instructions,
`audio.input.format` PCM16 at any `rate` from 8 to 48 kHz, `audio.input.turn_detection` server_vad
or null, `max_output_tokens`), `input_audio_buffer.append` / `commit` / `clear`,
`conversation.item.create` (user text, PCM16 audio and data-URI images; assistant and system text;
a video is sent as its frames, one `input_image` item each, as OpenAI's clients do),
`response.create`, `response.cancel`. With server_vad (the default) the server detects speech
(`input_audio_buffer.speech_started` / `speech_stopped`), commits the utterance as a user turn and
answers it; speech during an answer cancels it (barge-in). Answers stream as
`response.output_text.delta` events and end with `response.done`. An item's media are decoded when it
is added, by the media reader under `serving.limits` as on the HTTP routes, with the same words: a bad
one is an `error` event naming the part and the item, which is not added. An answer sees the latest
items whose media fit the per-conversation limits (`max_images`, ...).

Every client mistake and every limit (the serving config's `realtime` section: session length,
buffered audio, event size, events per second) is an `error` event naming it, and the session goes
on; only the session length ends it, with a close frame saying so. A wrong or missing token is
refused before the WebSocket opens (HTTP 401).

On SIGTERM (or SIGINT) every open session ends with close code 1001 and the reason "server shutting
down" (an answer in progress first ends with `response.done`, cancelled) before the server's own
shutdown starts: left to itself, uvicorn would cut each WebSocket with a bare 1012. New sessions are
refused meanwhile (HTTP 503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from serving import metrics
from serving.auth import websocket_token_matches
from serving.conversation import BadRequest
from serving.predictor import OmniPredictor
from serving.protocol.realtime.events import CLIENT_EVENT, CLIENT_EVENT_TYPES
from serving.protocol.realtime.session import RealtimeSession, SessionError

logger = logging.getLogger(__name__)
SUBPROTOCOL = "realtime"  # the one a browser client asks for (with its key); answered when offered
SESSION_ENDED = 1000  # a normal closure: the session's time is up
GOING_AWAY, SHUTDOWN_REASON = 1001, "server shutting down"
CLOSE_ON_EXIT_S = 5.0  # at most this long to close the sessions before the server's own shutdown starts
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the signals uvicorn shuts down on


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


class LiveSessions:
    """The open sessions of this process, so that a shutdown can end each one with a close frame."""

    def __init__(self) -> None:
        self.open: set[Connection] = set()
        self.closing = False

    async def close_all(self) -> None:
        self.closing = True
        ending = [c.end(GOING_AWAY, SHUTDOWN_REASON, "server_shutting_down") for c in list(self.open)]
        await asyncio.gather(*ending, return_exceptions=True)

    @asynccontextmanager
    async def closed_on_exit(self, app) -> AsyncIterator[None]:
        """The router's lifespan. It starts inside uvicorn's `serve`, after uvicorn has put its own
        handlers on SIGTERM/SIGINT (which close every WebSocket with 1012 and no reason): those are
        wrapped so that the sessions are closed first. Signals reach the main thread only; a server
        run elsewhere (a test client's thread) keeps uvicorn's behaviour."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        restore = close_first_on_exit(self.close_all)
        try:
            yield
        finally:
            restore()


def close_first_on_exit(close: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Make the current handlers of EXIT_SIGNALS run `close` (for at most CLOSE_ON_EXIT_S) before
    themselves; returns what puts them back."""
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in EXIT_SIGNALS}
    closing: set[asyncio.Task] = set()  # held, so the task is not collected mid-way

    async def close_then(handler, sig: int, frame) -> None:
        try:
            await asyncio.wait_for(close(), CLOSE_ON_EXIT_S)
        except Exception:
            logger.exception("closing the realtime sessions on exit failed")
        finally:
            handler(sig, frame)

    def on_signal(sig: int, frame) -> None:
        def start() -> None:
            task = loop.create_task(close_then(previous[sig], sig, frame))
            closing.add(task)
            task.add_done_callback(closing.discard)

        loop.call_soon_threadsafe(start)

    for sig, handler in previous.items():
        if callable(handler):  # only a handler that shuts the server down is delayed; never SIG_DFL/SIG_IGN
            signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in previous.items():
            if callable(handler) and signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    return restore


def build_router(predictor: OmniPredictor, token: str | None) -> APIRouter:
    sessions = LiveSessions()
    router = APIRouter(tags=["Realtime"], lifespan=sessions.closed_on_exit)

    @router.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols", [])
        if token and not websocket_token_matches(ws.headers.get("authorization"), offered, token):
            return await _deny(ws, 401, "missing or invalid bearer token", {"WWW-Authenticate": 'Bearer realm="omni"'})
        if ws.query_params.get("model", predictor.name) != predictor.name:
            return await _deny(ws, 404, f"this server serves {predictor.name!r}")
        if not predictor.ready:
            return await _deny(ws, 503, "the model is still loading", {"Retry-After": "1"})
        if sessions.closing:
            return await _deny(ws, 503, "the server is shutting down", {"Retry-After": "1"})
        await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        connection = Connection(ws, predictor)
        sessions.open.add(connection)
        if sessions.closing:  # the shutdown began during the handshake, after the sessions were closed
            sessions.open.discard(connection)
            return await ws.close(code=GOING_AWAY, reason=SHUTDOWN_REASON)
        try:
            with metrics.REALTIME_SESSIONS.track_inprogress():
                await connection.run()
        finally:
            sessions.open.discard(connection)

    return router


class Connection:
    """One WebSocket: frames in -> checked client events -> the session; its events out, one at a time."""

    def __init__(self, ws: WebSocket, predictor: OmniPredictor):
        self.ws, self.limits = ws, predictor.cfg.realtime
        self.lock = asyncio.Lock()  # the receive loop and the answer in progress both send
        self.session = RealtimeSession(predictor, self.send, self.limits)
        self.rate = EventRate(self.limits.max_events_per_s)
        self.closed = False  # the close frame is sent: nothing more goes out

    async def send(self, event: dict) -> None:
        async with self.lock:
            if not self.closed:
                await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    async def end(self, code: int, reason: str, cancel_reason: str) -> None:
        """End the session from the server's side: the answer in progress ends (`response.done`,
        cancelled for `cancel_reason`), then the close frame, with `reason`."""
        await self.session.close(cancel_reason)
        async with self.lock:
            if not self.closed:
                self.closed = True
                await self.ws.close(code=code, reason=reason)

    async def error(self, message: str, code: str, param: str | None = None, event_id: str | None = None,
                    kind: str = "invalid_request_error") -> None:
        metrics.REALTIME_ERRORS.labels(code).inc()
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
        await self.end(SESSION_ENDED, reason, "max_session_s")

    async def on_frame(self, text: str | None, data: bytes | None) -> None:
        if self.closed:  # the server ended the session; the client's close reply is still to come
            return
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
            metrics.REALTIME_EVENTS.labels("not_an_event").inc()
            return await self.error(f"the event is not valid JSON ({e})", "invalid_json")
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            metrics.REALTIME_EVENTS.labels("not_an_event").inc()
            return await self.error("an event must be a JSON object with a string 'type'", "invalid_event", "type")
        await self.on_event(raw)

    async def on_event(self, raw: dict) -> None:
        kind, event_id = raw["type"], raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
        # Labelled by the known types only: a client cannot grow the metric's label set.
        metrics.REALTIME_EVENTS.labels(kind if kind in CLIENT_EVENT_TYPES else "unknown_type").inc()
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
