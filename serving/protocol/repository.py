"""What this server answers to KServe's server-readiness, model-version and model-repository routes.

A predictor serves one model, fixed when it starts: the checkpoint under the InferenceService's
`storageUri`. The registry version it came from is a label of the InferenceService
(`omni-platform/model-version`), not part of any route. KServe 0.21's REST server would answer a
model version (`/v2/models/{name}/versions/{version}[/ready|/infer]`, or `?model_version=` on the
plain routes) with 501 ("not supported yet"), and its repository extension
(`/v2/repository/models/{name}/load|unload`) lets any client that holds the API token unload the
served model, after which the pod answers 503 to everyone until it restarts. Here:

- a model version is a 404 for any name and version: no model is served under a version, and the
  message names the route to use instead;
- repository load/unload are a 403 for everyone: which model serves is decided by rolling out an
  InferenceService (`omni promote`, `omni rollback`), which the registry records; a client of the
  endpoint, even one holding the token, cannot change it;
- the server is ready (`/v2/health/ready`) only once the served model has loaded: KServe's own answer
  is always yes, which would send traffic to a replica still loading its weights (the server loads
  the checkpoint after its port binds).

These routes are added to KServe's app before KServe adds its own (in `ModelServer.start`), so
they answer first.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from urllib.parse import parse_qs

import kserve
from fastapi import APIRouter
from fastapi.responses import JSONResponse

_VERSIONED = re.compile(r"^/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)(/ready|/infer)?/?$")


def version_error(served_model: str, model_name: str, version: str) -> dict:
    return {"error": f"model {model_name!r} has no version {version!r} here: this server serves {served_model!r} "
                     f"without versions; use /v2/models/{served_model}[/ready|/infer] (the registry version is the "
                     "InferenceService's omni-platform/model-version label)"}


class NoModelVersions:
    """ASGI middleware: a request naming a model version gets the 404 above before KServe's routes see it."""

    def __init__(self, app, served_model: str):
        self.app, self.served_model = app, served_model

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v2/models/"):
            asked = _asked_version(scope)
            if asked is not None:
                body = json.dumps(version_error(self.served_model, *asked)).encode()
                await send({"type": "http.response.start", "status": HTTPStatus.NOT_FOUND,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _asked_version(scope) -> tuple[str, str] | None:
    """(model name, version) when the request names a version (KServe ignores an empty one)."""
    path = scope["path"]
    if found := _VERSIONED.match(path):
        return found["name"], found["version"]
    versions = [v for v in parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model_version", []) if v]
    return (path.removeprefix("/v2/models/").split("/")[0], versions[0]) if versions else None


def build_router(served_model: str) -> APIRouter:
    """Repository load/unload, answered before KServe's own routes (added later, in start())."""
    router = APIRouter(prefix="/v2", include_in_schema=False)

    async def repository(model_name: str) -> JSONResponse:
        return JSONResponse(status_code=HTTPStatus.FORBIDDEN, content={"error": (
            f"model repository control is disabled: this server serves {served_model!r}, fixed at start; "
            "to serve another version, promote it (or roll back), which rolls out a new InferenceService")})

    for action in ("load", "unload"):
        router.add_api_route(f"/repository/models/{{model_name}}/{action}", repository, methods=["POST"])
    return router


def readiness_router(model: kserve.Model) -> APIRouter:
    """`/v2/health/ready`: 200 once `model` has loaded; before, KServe's own 503 (its ServerNotReady body)."""
    router = APIRouter(prefix="/v2", include_in_schema=False)

    async def ready() -> JSONResponse:
        if not await model.healthy():  # KServe's own answer, without raising: a probe is not an error to log
            return await kserve.errors.server_not_ready_handler(None, kserve.errors.ServerNotReady())
        return JSONResponse({"ready": True})

    router.add_api_route("/health/ready", ready, methods=["GET"])
    return router
