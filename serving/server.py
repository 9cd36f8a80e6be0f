"""Start the KServe model server with the omni predictor and the OpenAI-style route.

    python -m serving.server --model-dir CHECKPOINT [--model-name omni] [--http-port 8080]
                             [--serving-config conf/serving/local.yaml]

Endpoints: `/v2/...` (open inference protocol, what `tritonclient.http` speaks), `/v1/models/N:predict`,
`/openai/v1/chat/completions`, `/openai/v1/models`, health, and Prometheus `/metrics`. KServe's
HTTP server always binds 0.0.0.0 (it has no host option). gRPC is off: REST carries every protocol
we serve.

With OMNI_API_TOKEN_FILE (a mounted Secret, the chart's default) or OMNI_API_TOKEN set, every route
but health and /metrics requires `Authorization: Bearer <token>` (serving/auth.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from serving.auth import BearerTokenAuth, configured_token
from serving.config import ServingConfig
from serving.openai_api import build_router
from serving.predictor import OmniPredictor, kserve

INFERENCE_HEADER = "inference-header-content-length"
_DataPlane = kserve.protocol.dataplane.DataPlane


def _split_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """v2 binary BYTES layout: each element is a little-endian uint32 length, then that many bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise kserve.errors.InvalidInput(f"{name}: truncated BYTES tensor (incomplete length prefix)")
        size = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(raw):
            raise kserve.errors.InvalidInput(f"{name}: truncated BYTES tensor (element runs past the data)")
        items.append(raw[offset : offset + size])
        offset += size
    return items


def parse_v2_body(body: bytes, json_length: int, model_name: str) -> kserve.InferRequest:
    """A v2 REST body (JSON header, then binary tensors) -> InferRequest, keeping BYTES as bytes.

    KServe 0.21's own parser turns binary BYTES elements into UTF-8 `str`, so raw PNG/WAV/MP4 bytes
    fail there with a 500; this one keeps them as `bytes` and reports malformed bodies as 400."""
    invalid = kserve.errors.InvalidInput
    if not 0 < json_length <= len(body):
        raise invalid(f"{INFERENCE_HEADER} is {json_length}, the body is {len(body)} bytes")
    try:
        header = json.loads(body[:json_length])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"request JSON is malformed ({e})") from e
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise invalid('request needs an "inputs" list')
    offset, inputs = json_length, []
    for spec in header["inputs"]:
        if not isinstance(spec, dict) or not {"name", "shape", "datatype"} <= spec.keys():
            raise invalid('every input needs "name", "shape" and "datatype"')
        name, datatype = str(spec["name"]), str(spec["datatype"]).upper()
        params = dict(spec.get("parameters") or {})
        if "data" in spec:
            data = spec["data"]
        elif "binary_data_size" in params:
            size = params.pop("binary_data_size")
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise invalid(f"{name}: binary_data_size {size!r} does not fit the request body")
            raw, offset = body[offset : offset + size], offset + size
            if datatype == "BYTES":
                data = _split_bytes_tensor(raw, name)
            else:
                from kserve.utils.numpy_codec import to_np_dtype  # kserve.utils is shadowed by a module

                dtype = to_np_dtype(datatype)
                if dtype is None:
                    raise invalid(f"{name}: unknown datatype {datatype}")
                try:
                    data = np.frombuffer(raw, dtype=dtype)
                except ValueError as e:
                    raise invalid(f"{name}: {e}") from e
        else:
            raise invalid(f"{name}: neither 'data' nor a binary_data_size parameter")
        inputs.append(kserve.InferInput(name, spec["shape"], datatype, data=data, parameters=params))
    if offset != len(body):
        raise invalid(f"{len(body) - offset} bytes after the last binary tensor")
    outputs = [
        kserve.protocol.infer_type.RequestedOutput(o["name"], o.get("parameters"))
        for o in header.get("outputs") or []
        if isinstance(o, dict) and "name" in o
    ]
    return kserve.InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=header.get("id"),
        parameters=header.get("parameters"),
        request_outputs=outputs or None,
    )


class OmniDataPlane(_DataPlane):
    """KServe's data plane with a binary-safe v2 body parser and a body size limit. A body without
    the inference-header-content-length header is all JSON (tritonclient's JSON mode sends no
    Content-Type, which KServe would otherwise treat as binary and refuse)."""

    def __init__(self, model_registry, max_request_bytes: int):
        super().__init__(model_registry=model_registry)
        self.max_request_bytes = max_request_bytes

    def decode_inference_request(self, body, headers, model_name):
        if not isinstance(body, bytes):
            return super().decode_inference_request(body, headers, model_name)
        if len(body) > self.max_request_bytes:
            raise kserve.errors.InvalidInput(f"request body exceeds {self.max_request_bytes} bytes")
        declared = headers.get(INFERENCE_HEADER)
        try:
            json_length = len(body) if declared is None else int(declared)
        except ValueError as e:
            raise kserve.errors.InvalidInput(f"{INFERENCE_HEADER} is not an integer: {declared!r}") from e
        return parse_v2_body(body, json_length, model_name)


def build_server(model_dir: str | Path, cfg: ServingConfig) -> tuple[kserve.ModelServer, OmniPredictor]:
    """Load the checkpoint and assemble the server (not started)."""
    predictor = OmniPredictor(cfg.model_name, model_dir, cfg)
    predictor.load()
    server = kserve.ModelServer(http_port=cfg.http_port, enable_grpc=False, workers=1)
    # The REST server is built in start() from these: swap in our data plane, add our routes.
    server.dataplane = OmniDataPlane(server.registered_models, cfg.limits.max_request_bytes)
    kserve.model_server.app.include_router(build_router(predictor))
    if token := configured_token():  # the cluster sets OMNI_API_TOKEN_FILE (serving/auth.py)
        kserve.model_server.app.add_middleware(BearerTokenAuth, token=token)
    return server, predictor


def serve(model_dir: str | Path, cfg: ServingConfig | None = None) -> None:
    """Serve the checkpoint in `model_dir` (a local directory or file:// URI) until SIGINT/SIGTERM.
    Listens on 0.0.0.0:`cfg.http_port`."""
    server, predictor = build_server(model_dir, cfg or ServingConfig())
    server.start([predictor])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="checkpoint directory (or file:// URI)")
    parser.add_argument("--model-name", help="name in the URLs (default from the config: omni)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default from the config: 8080)")
    parser.add_argument("--serving-config", type=Path, help="YAML file with ServingConfig keys")
    args = parser.parse_args(argv)
    cfg = ServingConfig.from_yaml(args.serving_config) if args.serving_config else ServingConfig()
    overrides = {"model_name": args.model_name, "http_port": args.http_port}
    cfg = ServingConfig(**{**cfg.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    serve(args.model_dir, cfg)


if __name__ == "__main__":
    main()
