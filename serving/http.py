"""Per HTTP request: disconnect detection, Prometheus request metrics and the access log.

`RequestObserver` is a plain ASGI middleware around every route. Once a request's body has been
read it keeps listening on the connection; when the client goes away it sets the request's
`client_gone()` event, which the predictor watches to cancel the generation (KServe's own v1/v2
routes and ours alike). The access log line has the method, the path without its query string,
status, bytes, duration and the client address: never a body (media, prompts), a header (bearer
tokens) or a query string.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import time

from serving import metrics

access_log = logging.getLogger("omni.access")
_GONE: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("omni_client_gone", default=None)


def client_gone() -> asyncio.Event | None:
    """Set when the client of the request being handled has disconnected (None outside a request)."""
    return _GONE.get()


def configure_access_log() -> None:
    """Our access log replaces uvicorn's (which would print query strings)."""
    logging.getLogger("uvicorn.access").disabled = True
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


async def _watch(receive, body_read: asyncio.Event, gone: asyncio.Event) -> None:
    await body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


class RequestObserver:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, gone, body_read = time.perf_counter(), asyncio.Event(), asyncio.Event()
        sent = {"status": 500, "bytes": 0}

        async def receive_body():
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body"):
                body_read.set()
            return message

        async def send_counted(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        token = _GONE.set(gone)
        watcher = asyncio.create_task(_watch(receive, body_read, gone))
        try:
            await self.app(scope, receive_body, send_counted)
        finally:
            watcher.cancel()
            _GONE.reset(token)
            self._record(scope, sent, time.perf_counter() - start, gone.is_set())

    @staticmethod
    def _record(scope, sent: dict, seconds: float, gone: bool) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        status = 499 if gone and sent["status"] == 500 else sent["status"]  # 499: the client closed first
        metrics.REQUESTS.labels(route, str(status)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(seconds)
        client = scope.get("client") or ("-", 0)
        access_log.info('%s "%s %s" %s %dB %.1fms', client[0], scope["method"], scope["path"], status,
                        sent["bytes"], seconds * 1000)
