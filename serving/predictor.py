"""The KServe predictor: loads a checkpoint and answers conversations.

`OmniPredictor` is a `kserve.Model`, so KServe gives it health, metadata, Prometheus latency metrics
and the v1/v2 REST endpoints. Its `predict` speaks the v2 open inference protocol:

    inputs   text   BYTES [N]  user prompt per row, may hold <image>/<video>/<audio> tags
             image  BYTES [N]  optional, encoded PNG/JPEG per row (an empty element: none)
             audio  BYTES [N]  optional, WAV (any format ffmpeg decodes) per row
             video  BYTES [N]  optional, MP4 per row
    params   max_new_tokens (int, optional)
    outputs  text_output BYTES [N]

Binary-mode tensors carry raw media bytes; JSON-mode BYTES tensors are strings, so media there are
base64. A row with media but no tag gets the tag prepended. The OpenAI-style route
(`serving.openai_api`) reuses `build_chat`/`complete`/`stream` from here.

Every client mistake raises `BadRequest` (kserve's `InvalidInput`, so the v2 route answers 400)
with a message naming the field. Generation runs in worker threads under one lock: one model, one
batch at a time, and the event loop stays free for health checks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model.media.decode import MediaError, load_audio, load_image, load_video_frames, media_duration
from model.media.tags import TAG_PATTERN
from model.nn.checkpoint import CONFIG_FILE
from model.nn.generation import OmniChat
from model.text.processor import ChatInput
from serving.config import ServingConfig, resolve_storage_uri


def _import_kserve():
    """kserve parses `sys.argv` when imported (its own `--http_port`, `--configure_logging`, ...),
    and exits on a value it cannot parse; our command lines are not its command lines."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import kserve
    finally:
        sys.argv = saved
    return kserve


kserve = _import_kserve()

MEDIA_KINDS = ("image", "video", "audio")  # also the order of tags prepended to an untagged row
V2_INPUTS = ("text", *MEDIA_KINDS)
V2_OUTPUT = "text_output"


class BadRequest(kserve.errors.InvalidInput):
    """A client error; `param` names the offending field (OpenAI's `error.param`)."""

    def __init__(self, reason: str, param: str | None = None):
        super().__init__(reason)
        self.param = param


@dataclass
class MediaItem:
    kind: str  # "image" | "video" | "audio"
    data: bytes
    field: str  # where it came from, for error messages


@dataclass
class Conversation:
    """Messages with <image>/<video>/<audio> tags, plus the encoded media in tag order."""

    messages: list[dict]
    media: list[MediaItem] = field(default_factory=list)
    field: str = "messages"


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


def decode_base64(text: str, field: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{field}: invalid base64 ({e})", field) from e
    if not data:
        raise BadRequest(f"{field}: empty media", field)
    return data


class OmniPredictor(kserve.Model):
    def __init__(self, name: str, storage_uri: str | Path, cfg: ServingConfig | None = None):
        super().__init__(name)
        self.storage_uri = storage_uri
        self.cfg = cfg or ServingConfig(model_name=name)
        self.chat: OmniChat | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- lifecycle
    def load(self) -> bool:
        path = resolve_storage_uri(self.storage_uri)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")
        self.chat = OmniChat.load(path)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in V2_INPUTS]

    def get_output_types(self) -> list[dict]:
        return [{"name": V2_OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    # ------------------------------------------------------------------------ shared front end
    def max_new_tokens(self, requested, param: str) -> int:
        if requested is None:
            return self.cfg.max_new_tokens
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise BadRequest(f"{param}: must be a positive integer, got {requested!r}", param)
        if requested > self.cfg.limits.max_tokens:
            raise BadRequest(f"{param}: {requested} exceeds this server's limit of {self.cfg.limits.max_tokens}", param)
        return requested

    def check_counts(self, conv: Conversation) -> None:
        """Refuse too many media items before decoding any of them."""
        limits = self.cfg.limits
        caps = {"image": limits.max_images, "video": limits.max_videos, "audio": limits.max_audios}
        for kind, cap in caps.items():
            items = [m for m in conv.media if m.kind == kind]
            if len(items) > cap:
                raise BadRequest(f"{len(items)} {kind}s in one conversation; the limit is {cap}", items[cap].field)

    def build_chat(self, conv: Conversation) -> ChatInput:
        """Decode and check every media item (blocking: call from a worker thread)."""
        self.check_counts(conv)
        item = ChatInput(messages=conv.messages)
        for media in conv.media:
            if media.kind == "image":
                item.images.append(self._image(media))
            elif media.kind == "video":
                frames, times = self._video(media)
                item.videos.append(frames)
                item.video_times.append(times)
            else:
                item.audios.append(self._audio(media))
        return item

    def _image(self, media: MediaItem) -> Image.Image:
        cap = self.cfg.limits.max_image_pixels
        try:  # the header alone gives the size: refuse huge images before decoding pixels
            with Image.open(io.BytesIO(media.data)) as probe:
                width, height = probe.size
        except Image.DecompressionBombError as e:
            raise BadRequest(f"{media.field}: image too large ({e})", media.field) from e
        except Exception:  # not an image at all: load_image says why below
            width = height = 0
        if width * height > cap:
            raise BadRequest(f"{media.field}: image is {width}x{height}, more than {cap} pixels", media.field)
        try:
            return load_image(media.data)
        except MediaError as e:
            raise BadRequest(f"{media.field}: {e}", media.field) from e

    def _audio(self, media: MediaItem) -> np.ndarray:
        cap, rate = self.cfg.limits.max_audio_seconds, self.chat.model.cfg.audio.sampling_rate
        try:
            seconds = media_duration(media.data)
        except MediaError:
            seconds = None  # no duration in the header: checked after decoding
        if seconds is not None and seconds > cap:
            raise BadRequest(f"{media.field}: audio is {seconds:.1f} s, the limit is {cap:g} s", media.field)
        try:
            wave = load_audio(media.data, rate)
        except MediaError as e:
            raise BadRequest(f"{media.field}: {e}", media.field) from e
        if wave.size / rate > cap:
            raise BadRequest(f"{media.field}: audio is {wave.size / rate:.1f} s, the limit is {cap:g} s", media.field)
        return wave

    def _video(self, media: MediaItem) -> tuple[list[Image.Image], list[float]]:
        limits, video_cfg = self.cfg.limits, self.chat.model.cfg.video
        try:
            seconds = media_duration(media.data)
            if seconds > limits.max_video_seconds:
                raise BadRequest(
                    f"{media.field}: video is {seconds:.1f} s, the limit is {limits.max_video_seconds:g} s",
                    media.field,
                )
            frames, times = load_video_frames(
                media.data, fps=video_cfg.fps, max_frames=min(video_cfg.max_frames, limits.max_video_frames)
            )
        except MediaError as e:
            raise BadRequest(f"{media.field}: {e}", media.field) from e
        width, height = frames[0].size
        if width * height > limits.max_image_pixels:
            raise BadRequest(
                f"{media.field}: frames are {width}x{height}, more than {limits.max_image_pixels} pixels",
                media.field,
            )
        return frames, times

    # ---------------------------------------------------------------------------- generation
    def _prompt_tokens(self, item: ChatInput, max_new_tokens: int, param: str) -> int:
        """Tokenise once to validate (tags vs media, audio length) and to count; caller holds the lock."""
        try:
            n = len(self.chat.processor.encode(item, add_generation_prompt=True).input_ids)
        except ValueError as e:
            raise BadRequest(f"{param}: {e}", param) from e
        window = self.chat.model.cfg.llm.max_position_embeddings
        if n + max_new_tokens > window:
            raise BadRequest(
                f"{param}: prompt is {n} tokens; with max_tokens={max_new_tokens} that exceeds the "
                f"model's context of {window}",
                param,
            )
        return n

    def _count(self, text: str, max_new_tokens: int) -> int:
        """Tokens in an answer, by re-encoding its text (generation does not report its ids).
        Exact for clean text; capped because text with broken UTF-8 re-encodes longer."""
        return min(len(self.chat.tok.encode(text, add_special_tokens=False)), max_new_tokens) if text else 0

    def _complete_sync(self, convs: list[Conversation], max_new_tokens: int) -> list[Completion]:
        items = [self.build_chat(c) for c in convs]
        # The tokenizer is not safe to share between threads either, so it is used under the lock too.
        with self._lock:
            prompts = [self._prompt_tokens(it, max_new_tokens, c.field) for it, c in zip(items, convs, strict=True)]
            texts = self.chat.generate(items, max_new_tokens=max_new_tokens)
            counts = [self._count(t, max_new_tokens) for t in texts]
        return [
            Completion(t, p, n, "length" if n >= max_new_tokens else "stop")
            for t, p, n in zip(texts, prompts, counts, strict=True)
        ]

    async def complete(self, convs: list[Conversation], max_new_tokens: int) -> list[Completion]:
        """Greedy answers, one per conversation, generated as one batch."""
        return await asyncio.to_thread(self._complete_sync, convs, max_new_tokens)

    def _prepare_sync(self, conv: Conversation, max_new_tokens: int) -> tuple[ChatInput, int]:
        item = self.build_chat(conv)
        with self._lock:
            return item, self._prompt_tokens(item, max_new_tokens, conv.field)

    async def prepare(self, conv: Conversation, max_new_tokens: int) -> tuple[ChatInput, int]:
        """Decode and validate a conversation before a stream starts (afterwards no status can be sent)."""
        return await asyncio.to_thread(self._prepare_sync, conv, max_new_tokens)

    async def stream(self, item: ChatInput, max_new_tokens: int) -> AsyncIterator[str]:
        """Text deltas of one greedy answer. Generation runs to the end in its own thread even if
        the consumer stops early, so the lock is always released."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        def put(value) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, value)
            except RuntimeError:  # the loop closed (server shutting down): nobody is listening
                pass

        def produce() -> None:
            try:
                with self._lock:
                    for piece in self.chat.stream(item, max_new_tokens=max_new_tokens):
                        put(piece)
            except Exception as e:  # handed to the consumer, which re-raises it
                put(e)
            finally:
                put(end)

        threading.Thread(target=produce, name="omni-stream", daemon=True).start()
        while (value := await queue.get()) is not end:
            if isinstance(value, Exception):
                raise value
            yield value

    async def count_tokens(self, text: str, max_new_tokens: int) -> int:
        def count() -> int:
            with self._lock:
                return self._count(text, max_new_tokens)

        return await asyncio.to_thread(count)

    # ----------------------------------------------------------------------- v1 / v2 protocol
    async def predict(self, payload, headers: dict | None = None, response_headers: dict | None = None):
        if isinstance(payload, dict):
            return await self._predict_v1(payload)
        if not isinstance(payload, kserve.InferRequest):
            raise BadRequest(f"unsupported request type {type(payload).__name__}")
        for out in payload.request_outputs or []:
            if out.name != V2_OUTPUT:
                raise BadRequest(f"unknown output {out.name!r}; this model returns {V2_OUTPUT!r}", out.name)
        columns: dict[str, list] = {}
        for inp in payload.inputs:
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
        params = payload.parameters or {}
        max_new = self.max_new_tokens(params.get("max_new_tokens"), "max_new_tokens")
        texts = [c.text for c in await self.complete(self._rows(columns), max_new)]
        output = kserve.InferOutput(
            V2_OUTPUT, [len(texts)], "BYTES", data=np.array([t.encode() for t in texts], dtype=np.object_)
        )
        return kserve.InferResponse(
            response_id=payload.id or uuid.uuid4().hex,
            model_name=self.name,
            infer_outputs=[output],
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )

    async def _predict_v1(self, payload: dict) -> dict:
        """v1: {"instances": [{"text": ..., "image": base64, ...}], "parameters": {...}}."""
        instances = payload.get("instances")
        if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
            raise BadRequest('"instances" must be a list of objects like {"text": "..."}', "instances")
        for i, inst in enumerate(instances):
            unknown = set(inst) - set(V2_INPUTS)
            if unknown:
                raise BadRequest(f"instances[{i}]: unknown key(s) {sorted(unknown)}", f"instances[{i}]")
            if any(not isinstance(v, str) for v in inst.values()):
                raise BadRequest(f"instances[{i}]: values must be strings (media as base64)", f"instances[{i}]")
        columns = {
            name: [inst.get(name, "") for inst in instances]
            for name in V2_INPUTS
            if name == "text" or any(name in inst for inst in instances)
        }
        params = payload.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest('"parameters" must be an object', "parameters")
        max_new = self.max_new_tokens(params.get("max_new_tokens"), "max_new_tokens")
        return {"predictions": [c.text for c in await self.complete(self._rows(columns), max_new)]}

    def _rows(self, columns: dict[str, list]) -> list[Conversation]:
        """Tensor columns -> one single-turn conversation per row."""
        if "text" not in columns:
            raise BadRequest("missing input 'text'", "text")
        n = len(columns["text"])
        if n == 0:
            raise BadRequest("'text' is empty", "text")
        if n > self.cfg.limits.max_batch_size:
            raise BadRequest(f"{n} rows in one request; the limit is {self.cfg.limits.max_batch_size}", "text")
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
                    media.append(MediaItem(kind, data, f"{kind}[{i}]"))
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
    missing = []
    for kind in MEDIA_KINDS:
        have = 1 if kind in kinds else 0
        if tags.count(kind) > have:
            raise BadRequest(f"{field}: {tags.count(kind)} <{kind}> tag(s) but {have} {kind} in this row", field)
        if have and not tags.count(kind):
            missing.append(f"<{kind}>")
    return "".join(missing) + text
