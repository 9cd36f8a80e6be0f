"""Bearer-token authentication for the predictor's endpoints.

On a cluster the token comes from a Kubernetes Secret mounted as a file (the chart's default,
`OMNI_API_TOKEN_FILE`); `OMNI_API_TOKEN` is accepted for local runs. With neither set the server
is open, as for `omni serve` on a laptop. Health probes and Prometheus `/metrics` stay open: the
kubelet and the scraper carry no token (the chart's NetworkPolicy limits who reaches the port).
The check lives in the predictor rather than in a mesh policy so it holds whatever ingress the
cluster has (Kourier, Istio, or a port-forward).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

TOKEN_FILE_ENV = "OMNI_API_TOKEN_FILE"
TOKEN_ENV = "OMNI_API_TOKEN"
OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/metrics"})


def configured_token(env: dict[str, str] | None = None) -> str | None:
    """The token the server requires, or None for an open server. A named but missing or empty
    token file is an error: starting open by accident would be worse than not starting."""
    env = dict(os.environ) if env is None else env
    if path := env.get(TOKEN_FILE_ENV):
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise RuntimeError(f"{TOKEN_FILE_ENV}={path}: cannot read the API token ({err.strerror})") from None
        if not token:
            raise RuntimeError(f"{TOKEN_FILE_ENV}={path} is empty: put the API token in the Secret")
        return token
    return env.get(TOKEN_ENV) or None


def bearer_token_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header value is `Bearer <token>`. The one check of every route: the
    middleware below for HTTP, the WebSocket route (which middleware of this kind never sees) itself."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and _same(given.strip(), token)


def _same(given: str, token: str) -> bool:
    # compare_digest: the time taken must not tell an attacker how much of the token matched.
    return hmac.compare_digest(given.encode(), token.encode())


# A browser cannot set headers on a WebSocket; OpenAI's Realtime API takes the key as a subprotocol instead.
API_KEY_SUBPROTOCOL = "openai-insecure-api-key."


def websocket_token_matches(authorization: str | None, subprotocols: list[str], token: str) -> bool:
    """Whether a WebSocket handshake carries the token: as `Authorization: Bearer <token>`, or (from a
    browser) as the subprotocol `openai-insecure-api-key.<token>`. At least one must be given, and
    every one given must be right."""
    keys = [p.removeprefix(API_KEY_SUBPROTOCOL) for p in subprotocols if p.startswith(API_KEY_SUBPROTOCOL)]
    checks = [bearer_token_matches(authorization, token)] if authorization is not None else []
    checks += [_same(key, token) for key in keys]
    return bool(checks) and all(checks)


class BearerTokenAuth(BaseHTTPMiddleware):
    """401 for any request outside OPEN_PATHS without `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str):
        super().__init__(app)
        self._token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        if not bearer_token_matches(request.headers.get("authorization", ""), self._token):
            return JSONResponse({"error": "missing or invalid bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="omni"'})
        return await call_next(request)
