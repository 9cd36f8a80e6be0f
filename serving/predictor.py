"""The KServe predictor: loads a checkpoint and answers conversations, in KServe's request phases.

    preprocess   a request (v2 `InferRequest`, v1 dict, or `ChatRequest` from the OpenAI route) ->
                 conversations -> media decoded and checked against the serving limits -> tokenised
    predict      one batched, KV-cached greedy `generate` over the request's conversations
    postprocess  the protocol's response: a v2 `InferResponse`, v1 `{"predictions"}`, or the
                 `Completion`s the OpenAI route renders

`OmniPredictor` is a `kserve.Model`, so KServe gives it health, metadata, Prometheus latency
metrics per phase and the v1/v2 REST endpoints (`serving.protocol.v2` has the tensor layout).

Every client mistake raises `BadRequest` (kserve's `InvalidInput`, so the routes answer 400) with a
message naming the field. Generation runs in worker threads under one lock: one model, one batch at
a time, and the event loop stays free for health checks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import kserve

from model.media.decode import MediaError
from model.media.limits import LimitExceeded, MediaLimits, read_audio, read_image, read_video
from model.nn.checkpoint import CONFIG_FILE
from model.nn.generation import OmniChat
from model.text.processor import ChatInput
from serving.config import ServingConfig, resolve_storage_uri
from serving.conversation import BadRequest, Completion, Conversation, MediaItem
from serving.protocol import v2
from serving.protocol.v2 import V2_INPUTS, V2_OUTPUT


@dataclass
class ChatRequest:
    """What the OpenAI route hands to the predictor: one conversation and its token budget."""

    conversation: Conversation
    max_new_tokens: int


@dataclass
class Prepared:
    """A request after preprocess: decoded, tokenised, ready to generate."""

    protocol: str  # "v2" | "v1" | "chat"
    items: list[ChatInput]
    prompt_tokens: list[int]
    max_new_tokens: int
    request: object = None  # the v2 InferRequest, for the response's id and output settings
    completions: list[Completion] = field(default_factory=list)  # filled by predict


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

    # ------------------------------------------------------------------------------ the phases
    async def preprocess(self, payload, headers: dict | None = None) -> Prepared:
        if isinstance(payload, ChatRequest):
            protocol, convs, max_new, request = "chat", [payload.conversation], payload.max_new_tokens, None
        elif isinstance(payload, kserve.InferRequest):
            params = v2.parameters(payload.parameters)
            max_new = self.max_new_tokens(params.get("max_new_tokens"), "max_new_tokens")
            protocol, convs, request = "v2", v2.rows(v2.v2_columns(payload), self.cfg.limits.max_batch_size), payload
        elif isinstance(payload, dict):
            params = v2.parameters(payload.get("parameters"))
            max_new = self.max_new_tokens(params.get("max_new_tokens"), "max_new_tokens")
            protocol, convs, request = "v1", v2.rows(v2.v1_columns(payload), self.cfg.limits.max_batch_size), None
        else:
            raise BadRequest(f"unsupported request type {type(payload).__name__}")
        items, prompts = await asyncio.to_thread(self._prepare_sync, convs, max_new)
        return Prepared(protocol, items, prompts, max_new, request)

    async def predict(self, payload: Prepared, headers: dict | None = None, response_headers: dict | None = None
                      ) -> Prepared:
        payload.completions = await asyncio.to_thread(self._generate_sync, payload)
        return payload

    async def postprocess(self, result: Prepared, headers: dict | None = None, response_headers: dict | None = None):
        texts = [c.text for c in result.completions]
        if result.protocol == "v2":
            return v2.infer_response(result.request, self.name, texts)
        if result.protocol == "v1":
            return {"predictions": texts}
        return result.completions

    # ------------------------------------------------------------------------- request checks
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

    def media_limits(self) -> MediaLimits:
        limits = self.cfg.limits
        return MediaLimits(source="serving.limits", max_image_pixels=limits.max_image_pixels,
                           max_video_seconds=limits.max_video_seconds, max_audio_seconds=limits.max_audio_seconds)

    def build_chat(self, conv: Conversation) -> ChatInput:
        """Decode and check every media item (blocking: call from a worker thread)."""
        self.check_counts(conv)
        item = ChatInput(messages=conv.messages)
        for media in conv.media:
            try:
                self._decode(media, item)
            except MediaError as e:
                sep = " " if isinstance(e, LimitExceeded) else ": "
                raise BadRequest(f"{media.field}{sep}{e}", media.field) from e
        return item

    def _decode(self, media: MediaItem, item: ChatInput) -> None:
        model_cfg, limits = self.chat.model.cfg, self.media_limits()
        if media.kind == "image":
            item.images.append(read_image(media.data, limits))
        elif media.kind == "video":
            frames = min(model_cfg.video.max_frames, self.cfg.limits.max_video_frames)
            video = read_video(media.data, limits, model_cfg.video.fps, frames)
            item.videos.append(video.frames)
            item.video_times.append(video.times)
        else:
            item.audios.append(read_audio(media.data, limits, model_cfg.audio.sampling_rate))

    def _prompt_tokens(self, item: ChatInput, max_new_tokens: int, param: str) -> int:
        """Tokenise once to validate (tags vs media, audio length) and to count; caller holds the lock."""
        try:
            n = len(self.chat.processor.encode(item, add_generation_prompt=True).input_ids)
        except ValueError as e:
            raise BadRequest(f"{param}: {e}", param) from e
        window = self.chat.model.cfg.llm.max_position_embeddings
        if n + max_new_tokens > window:
            raise BadRequest(f"{param}: prompt is {n} tokens; with max_tokens={max_new_tokens} that exceeds the "
                             f"model's context of {window}", param)
        return n

    # ---------------------------------------------------------------------------- generation
    def _prepare_sync(self, convs: list[Conversation], max_new_tokens: int) -> tuple[list[ChatInput], list[int]]:
        items = [self.build_chat(c) for c in convs]
        # The tokenizer is not safe to share between threads either, so it is used under the lock too.
        with self._lock:
            return items, [self._prompt_tokens(it, max_new_tokens, c.field) for it, c in zip(items, convs, strict=True)]

    def _count(self, text: str, max_new_tokens: int) -> int:
        """Tokens in an answer, by re-encoding its text (generation does not report its ids).
        Exact for clean text; capped because text with broken UTF-8 re-encodes longer."""
        return min(len(self.chat.tok.encode(text, add_special_tokens=False)), max_new_tokens) if text else 0

    def _generate_sync(self, job: Prepared) -> list[Completion]:
        with self._lock:
            texts = self.chat.generate(job.items, max_new_tokens=job.max_new_tokens)
            counts = [self._count(t, job.max_new_tokens) for t in texts]
        return [Completion(t, p, n, "length" if n >= job.max_new_tokens else "stop")
                for t, p, n in zip(texts, job.prompt_tokens, counts, strict=True)]

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
