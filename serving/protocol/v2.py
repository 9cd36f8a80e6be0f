"""The v2 open inference protocol (and KServe's v1) for the omni model, as tensors of BYTES rows:

    inputs   text   BYTES [N]  user prompt per row, may hold <image>/<video>/<audio> tags
             image  BYTES [N]  optional, encoded PNG/JPEG per row (an empty element: none)
             audio  BYTES [N]  optional, WAV (any format ffmpeg decodes) per row
             video  BYTES [N]  optional, MP4 per row
    params   max_new_tokens (int, optional)
             use_audio_in_video (bool, optional; absent: the model's video.use_audio_in_video) feeds each
             video's sound track with its frames
    outputs  text_output BYTES [N]

Binary-mode tensors carry raw media bytes; JSON-mode BYTES tensors are strings, so media there are
base64. A row with media but no tag gets the tag prepended. v1 is the same rows as
`{"instances": [{"text": ..., "image": base64}], "parameters": {...}}` -> `{"predictions": [...]}`.
v1/v2 requests are answered greedily (Triton's entry model does the same).

KServe's own v1/v2 routes hand the predictor their payloads as they are: `TensorProtocol` is how it
reads them (one single-turn conversation per row) and how their answers are formatted back.
`BinarySafeDataPlane` is how KServe's v2 route reads a request body.
"""

from __future__ import annotations

import json
import uuid
from functools import partial

import kserve
import numpy as np

from model.media.tags import MEDIA_KINDS, TAG_PATTERN, tag_missing_media
from model.nn.sampling import SamplingParams
from serving.conversation import BadRequest, Completion, Conversation, GenerateRequest, MediaItem, decode_base64
from serving.predictor import OmniPredictor

V2_INPUTS = ("text", *MEDIA_KINDS)
V2_OUTPUT = "text_output"
INFERENCE_HEADER = "inference-header-content-length"


# ------------------------------------------------------------------------------ tensors -> rows
def v2_columns(request: kserve.InferRequest) -> dict[str, list]:
    """The request's input tensors as flat columns, each checked (names, types, shapes)."""
    for out in request.request_outputs or []:
        if out.name != V2_OUTPUT:
            raise BadRequest(f"unknown output {out.name!r}; this model returns {V2_OUTPUT!r}", out.name)
    columns: dict[str, list] = {}
    for inp in request.inputs:
        if inp.name not in V2_INPUTS:
            raise BadRequest(f"unknown input {inp.name!r}; expected {', '.join(V2_INPUTS)}", inp.name)
        if inp.name in columns:
            raise BadRequest(f"input {inp.name!r} given twice", inp.name)
        if inp.datatype != "BYTES":
            raise BadRequest(f"{inp.name}: datatype must be BYTES, got {inp.datatype}", inp.name)
        try:
            columns[inp.name] = inp.as_numpy().reshape(-1).tolist()
        except (ValueError, TypeError) as e:
            raise BadRequest(f"{inp.name}: data does not match shape {inp.shape} ({e})", inp.name) from e
    return columns


def v1_columns(payload: dict) -> dict[str, list]:
    """v1 instances as the same columns."""
    instances = payload.get("instances")
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise BadRequest('"instances" must be a list of objects like {"text": "..."}', "instances")
    for i, inst in enumerate(instances):
        unknown = set(inst) - set(V2_INPUTS)
        if unknown:
            raise BadRequest(f"instances[{i}]: unknown key(s) {sorted(unknown)}", f"instances[{i}]")
        if any(not isinstance(v, str) for v in inst.values()):
            raise BadRequest(f"instances[{i}]: values must be strings (media as base64)", f"instances[{i}]")
    return {name: [inst.get(name, "") for inst in instances]
            for name in V2_INPUTS if name == "text" or any(name in inst for inst in instances)}


def parameters(params) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest('"parameters" must be an object', "parameters")
    return params


def use_audio_in_video(params: dict) -> bool | None:
    """The request's `use_audio_in_video` parameter; None (the model's default) when absent."""
    value = params.get("use_audio_in_video")
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"use_audio_in_video: expected a boolean, got {value!r}", "use_audio_in_video")
    return value


def rows(columns: dict[str, list], max_rows: int, use_audio: bool | None = None) -> list[Conversation]:
    """Tensor columns -> one single-turn conversation per row; `use_audio` applies to every video."""
    if "text" not in columns:
        raise BadRequest("missing input 'text'", "text")
    n = len(columns["text"])
    if n == 0:
        raise BadRequest("'text' is empty", "text")
    if n > max_rows:
        raise BadRequest(f"{n} rows in one request; the limit is {max_rows}", "text")
    for name in MEDIA_KINDS:
        if name in columns and len(columns[name]) != n:
            raise BadRequest(
                f"{name}: {len(columns[name])} element(s) but 'text' has {n}; "
                "send one per row (an empty element for none)",
                name,
            )
    rows = []
    for i in range(n):
        text = _as_text(columns["text"][i], f"text[{i}]")
        media = []
        for kind in MEDIA_KINDS:
            raw = columns.get(kind, [b""] * n)[i]
            data = _as_media(raw, f"{kind}[{i}]")
            if data:
                media.append(MediaItem(kind, data, f"{kind}[{i}]", use_audio if kind == "video" else None))
        content = _place_tags(text, {m.kind for m in media}, f"text[{i}]")
        rows.append(Conversation([{"role": "user", "content": content}], media, f"text[{i}]"))
    return rows


def _as_text(value, field: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"{field}: not valid UTF-8 ({e})", field) from e
    if isinstance(value, str):
        return value
    raise BadRequest(f"{field}: expected a string, got {type(value).__name__}", field)


def _as_media(value, field: str) -> bytes:
    """Raw bytes (binary tensors) as they are; strings (JSON tensors) are base64. Empty: no media."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return decode_base64(value, field) if value else b""
    raise BadRequest(f"{field}: expected bytes or a base64 string, got {type(value).__name__}", field)


def _place_tags(text: str, kinds: set[str], field: str) -> str:
    """Check the row's tags against its media; prepend the tag of media the text does not mention."""
    tags = TAG_PATTERN.findall(text)
    for kind in MEDIA_KINDS:
        have = 1 if kind in kinds else 0
        if tags.count(kind) > have:
            raise BadRequest(f"{field}: {tags.count(kind)} <{kind}> tag(s) but {have} {kind} in this row", field)
    return tag_missing_media(text, {kind: 1 for kind in kinds})


# ------------------------------------------------------------------------------ outputs
def infer_response(request: kserve.InferRequest, model_name: str, completions: list[Completion]
                   ) -> kserve.InferResponse:
    texts = [c.text for c in completions]
    output = kserve.InferOutput(V2_OUTPUT, [len(texts)], "BYTES",
                                data=np.array([t.encode() for t in texts], dtype=np.object_))
    return kserve.InferResponse(response_id=request.id or uuid.uuid4().hex, model_name=model_name,
                                infer_outputs=[output], use_binary_outputs=request.use_binary_outputs,
                                requested_outputs=request.request_outputs)


def v1_response(completions: list[Completion]) -> dict:
    return {"predictions": [c.text for c in completions]}


# ------------------------------------------------------------------------------ the predictor's reader
class TensorProtocol:
    """What the predictor needs to answer KServe's own routes: a v2 `InferRequest` or a v1 dict in,
    its `GenerateRequest` (greedy, `max_new_tokens` from the parameters) and the v2 metadata."""

    def read(self, payload: object, predictor: OmniPredictor) -> GenerateRequest:
        max_rows = predictor.cfg.limits.max_batch_size
        if isinstance(payload, kserve.InferRequest):
            given = parameters(payload.parameters)
            columns, respond = v2_columns(payload), partial(infer_response, payload, predictor.name)
        elif isinstance(payload, dict):
            given = parameters(payload.get("parameters"))
            columns, respond = v1_columns(payload), v1_response
        else:
            raise BadRequest(f"unsupported request type {type(payload).__name__}")
        convs = rows(columns, max_rows, use_audio_in_video(given))
        return GenerateRequest(convs, _greedy(given, predictor), respond)

    def input_types(self) -> list[dict]:
        return [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in V2_INPUTS]

    def output_types(self) -> list[dict]:
        return [{"name": V2_OUTPUT, "datatype": "BYTES", "shape": [-1]}]


def _greedy(params: dict, predictor: OmniPredictor) -> SamplingParams:
    return SamplingParams(max_new_tokens=predictor.max_new_tokens(params.get("max_new_tokens"), "max_new_tokens"))


# ------------------------------------------------------------------------------ binary bodies
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


class BinarySafeDataPlane(kserve.protocol.dataplane.DataPlane):
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
