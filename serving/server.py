"""Start the KServe model server with the omni predictor and the OpenAI-style route.

    python -m serving.server --model_dir CHECKPOINT [--model_name omni] [--http_port 8080]
                             [--serving_config conf/serving/local.yaml] [any other KServe server flag]

The command line is KServe's own (`kserve.model_server.parser`: --http_port, --workers,
--enable_latency_logging (off here unless given: the access log has each request's duration), ...)
plus ours; dashed spellings (--model-dir, --http-port) work too.
Flags given win over the serving config file; the file's values win over KServe's defaults.

Endpoints: `/v2/...` (open inference protocol, what `tritonclient.http` speaks), `/v1/models/N:predict`,
`/openai/v1/chat/completions`, `/openai/v1/models`, the Realtime API's WebSocket `/v1/realtime`
(serving/protocol/realtime/routes.py), health, Prometheus `/metrics` and the OpenAPI document
`/openapi.json`. A model version (`/v2/models/N/versions/V/...`, `?model_version=V`) is a 404 and the model
repository's load/unload a 403: this server serves one model, fixed at start (serving/protocol/repository.py). KServe's
HTTP server always binds 0.0.0.0 (it has no host option). gRPC is off: REST carries every protocol
we serve.

Concurrent requests share the model through the predictor's generation engine (continuous
batching, `batching` in the serving config); a full queue is a 429 with Retry-After. On SIGTERM the
server first ends each realtime session with a close frame saying why (1001), then stops accepting
connections, lets in-flight requests finish for `shutdown_grace_s` (uvicorn's graceful shutdown; the
chart's terminationGracePeriodSeconds should exceed it), and exits.
Prometheus metrics (serving/metrics.py) and the access log (serving/http.py) cover every route.

With OMNI_API_TOKEN_FILE (a mounted Secret, the chart's default) or OMNI_API_TOKEN set, every route
but health and /metrics requires `Authorization: Bearer <token>` (serving/auth.py).

This file wires the parts: the predictor (which knows no protocol), the protocols that parse
requests for it and format its answers (serving/protocol/), and KServe. KServe is extended as its
own custom-model example does: routes, exception handlers and middleware go on
`kserve.model_server.app`, the FastAPI app that `ModelServer.start` serves and adds its own routes
to. The one piece KServe offers no public hook for is how its v2 route parses a request body
(`_parse_v2_bodies_binary_safe`).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

import kserve
from fastapi.responses import JSONResponse

from serving.auth import BearerTokenAuth, configured_token
from serving.config import ServingConfig
from serving.http import RequestObserver, configure_access_log
from serving.predictor import RETRY_AFTER_S, DeadlineExceeded, OmniPredictor, Overloaded
from serving.protocol import repository
from serving.protocol.openai.routes import build_router
from serving.protocol.realtime import routes as realtime
from serving.protocol.v2 import BinarySafeDataPlane, TensorProtocol


def build_server(model_dir: str | Path, cfg: ServingConfig, load: bool = True,
                 **server_args) -> tuple[kserve.ModelServer, OmniPredictor]:
    """Assemble the server (not started), loading the checkpoint first unless `load` is False.
    `server_args` go to kserve.ModelServer (workers, max_threads, ...)."""
    predictor = OmniPredictor(cfg.model_name, model_dir, cfg, TensorProtocol())
    if load:
        predictor.load()
    server = kserve.ModelServer(**{"workers": 1, "enable_latency_logging": False, **server_args,
                                   "http_port": cfg.http_port, "enable_grpc": False,
                                   "grace_period": cfg.shutdown_grace_s})
    _parse_v2_bodies_binary_safe(server, cfg.limits.max_request_bytes)
    app = kserve.model_server.app  # what ModelServer.start serves, adding KServe's own routes after ours
    app.include_router(build_router(predictor))
    token = configured_token()  # the cluster sets OMNI_API_TOKEN_FILE (serving/auth.py)
    # WebSockets pass HTTP middleware by: the realtime route checks the same token itself.
    app.include_router(realtime.build_router(predictor, token))
    # Before KServe's own routes: readiness waits for the model, repository control is a 403.
    app.include_router(repository.readiness_router(predictor))
    app.include_router(repository.build_router(cfg.model_name))
    # KServe's v1/v2 routes raise these from the predictor; the OpenAI route answers them itself.
    app.add_exception_handler(Overloaded, _retry_later(429))
    app.add_exception_handler(DeadlineExceeded, _retry_later(503))
    # Middleware added later wraps what came before: the observer outermost (it counts and logs 401s
    # too), then the token check (401 before anything else), then the model-version guard.
    app.add_middleware(repository.NoModelVersions, served_model=cfg.model_name)
    if token:
        app.add_middleware(BearerTokenAuth, token=token)
    app.add_middleware(RequestObserver)
    configure_access_log()
    return server, predictor


def _parse_v2_bodies_binary_safe(server: kserve.ModelServer, max_request_bytes: int) -> None:
    """KServe 0.21's own v2 body parser turns binary BYTES elements into str, so raw PNG/WAV/MP4
    bytes fail with a 500, and it knows no body size limit. ModelServer takes no data plane (nor any
    parser) as an argument: it builds one in its constructor and hands `server.dataplane` to its REST
    server in start(). Replacing that attribute before start() is the only way in."""
    server.dataplane = BinarySafeDataPlane(server.registered_models, max_request_bytes)


def _retry_later(status: int):
    async def handler(request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=status, headers={"Retry-After": str(RETRY_AFTER_S)})

    return handler


def serve(model_dir: str | Path, cfg: ServingConfig | None = None, **server_args) -> None:
    """Serve the checkpoint in `model_dir` (a local directory or file:// URI) until SIGINT/SIGTERM.
    Listens on 0.0.0.0:`cfg.http_port` at once and loads the model meanwhile: liveness passes while
    a large checkpoint loads, /v2/health/ready (and the model's ready route) only once it has."""
    server, predictor = build_server(model_dir, cfg or ServingConfig(), load=False, **server_args)
    server.register_model(predictor)  # unloaded: ready is False until load() returns
    predictor.enable_latency_logging = server.enable_latency_logging
    _load_in_background(predictor)
    server.start([])


def _load_in_background(predictor: OmniPredictor) -> threading.Thread:
    """Load the checkpoint off the event loop; a failed load ends the process (non-zero) so the pod
    restarts with the error in its log instead of staying live and never ready."""

    def run() -> None:
        try:
            predictor.load()
            logging.getLogger(__name__).info("model %s loaded: ready", predictor.name)
        except BaseException:
            logging.getLogger(__name__).exception("loading model %s failed", predictor.name)
            os._exit(3)

    thread = threading.Thread(target=run, name="omni-model-load", daemon=True)
    thread.start()
    return thread


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.server", parents=[kserve.model_server.parser],
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", "--model-dir", required=True, help="checkpoint directory (or file:// URI)")
    p.add_argument("--serving_config", "--serving-config", type=Path, help="YAML file with ServingConfig keys")
    # Dashed spellings of KServe's own flags; None below = not given, so the config file decides.
    p.add_argument("--http-port", dest="http_port", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--model-name", dest="model_name", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(http_port=None, model_name=None)
    # KServe's per-request latency log lines are off unless asked for: the access log has each request's
    # duration and /metrics the per-phase latencies, and their two getrusage calls and log writes per
    # request on the event loop each wait for the GIL while the engine thread decodes.
    p.set_defaults(enable_latency_logging=False)
    return p


# KServe's server settings we pass on; the rest of its flags it reads itself (kserve.model_server.args).
_SERVER_ARGS = ("workers", "max_threads", "max_asyncio_workers", "enable_docs_url", "enable_latency_logging",
                "access_log_format", "timeout_keep_alive")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = ServingConfig.from_yaml(args.serving_config) if args.serving_config else ServingConfig()
    given = {"model_name": args.model_name, "http_port": args.http_port}
    cfg = ServingConfig(**{**cfg.model_dump(), **{k: v for k, v in given.items() if v is not None}})
    serve(args.model_dir, cfg, **{k: getattr(args, k) for k in _SERVER_ARGS if hasattr(args, k)})


if __name__ == "__main__":
    main()
