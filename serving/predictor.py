"""The KServe predictor: loads a checkpoint and answers requests, in KServe's request phases.

    preprocess   a `GenerateRequest` (serving.conversation) -> media decoded and checked against the
                 serving limits -> tokenised
    predict      one `Sequence` per conversation, submitted to the generation engine, awaited
    postprocess  the request's own `respond` turns the `Completion`s into its protocol's response

The predictor knows no protocol. A protocol parses its request into a `GenerateRequest` and formats
the results back (`serving.protocol`): the OpenAI route calls the predictor with one; KServe's own
v1/v2 routes hand it their raw payloads, which the `PayloadProtocol` given at construction reads.

`OmniPredictor` is a `kserve.Model`, so KServe gives it health, metadata, Prometheus latency
metrics per phase and the v1/v2 REST endpoints.

Generation is `model.nn.engine.GenerationEngine` in its own thread: requests that arrive together
are decoded as one batch, a newcomer joining between decode steps (continuous batching). Its queue
is bounded (`batching.max_queue`): beyond it a request gets `Overloaded` (429 with Retry-After).
Every request has a deadline (`limits.request_timeout_s`: `DeadlineExceeded`, 503), and a client
that disconnects cancels its sequences (`serving.http.client_gone`). Every call into the engine is
in this file.

Every client mistake raises `BadRequest` (kserve's `InvalidInput`, so the routes answer 400) with a
message naming the field. Media decoding and tokenising run in worker threads, so the event loop
stays free for health checks; they share the tokenizer under one lock (the engine detokenises with
its own copy, so a decode step never waits for a request being tokenised).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import kserve
import torch

from model.media.decode import MediaError
from model.media.inputs import MediaReader, RawMedia
from model.media.limits import MediaLimits
from model.nn.checkpoint import CONFIG_FILE
from model.nn.engine import CapacityError, Event, GenerationEngine, QueueFull, Sequence
from model.nn.generation import OmniChat
from model.nn.sampling import SamplingParams
from model.text.processor import ChatInput, Encoded
from serving.config import ServingConfig, resolve_storage_uri
from serving.conversation import BadRequest, Completion, Conversation, GenerateRequest, MediaItem
from serving.http import client_gone
from serving.metrics import PrometheusObserver
from serving.tokens import token_bytes

RETRY_AFTER_S = 1


class Overloaded(Exception):
    """The engine's queue is full: 429 with Retry-After."""


class DeadlineExceeded(Exception):
    """The request did not finish within limits.request_timeout_s: 503 with Retry-After."""


class OutOfCapacity(DeadlineExceeded):
    """The engine could not hold the request: it exceeds the KV cache a sequence gets, or the GPU ran out
    of memory in its step. Answered as a deadline is (503 with Retry-After), with the reason."""


class ClientGone(Exception):
    """The client disconnected; its generation was cancelled and nobody reads the answer."""


class PayloadProtocol(Protocol):
    """How the payloads of KServe's own v1/v2 routes (which reach `preprocess` as they are) become
    `GenerateRequest`s, and what the model's v2 metadata says it takes and returns."""

    def read(self, payload: object, predictor: OmniPredictor) -> GenerateRequest: ...

    def input_types(self) -> list[dict]: ...

    def output_types(self) -> list[dict]: ...


@dataclass
class Prepared:
    """A request after preprocess: decoded, tokenised, ready to generate."""

    request: GenerateRequest
    encoded: list[Encoded]
    completions: list[Completion] = field(default_factory=list)  # filled by predict

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_tokens(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]


class OmniPredictor(kserve.Model):
    def __init__(self, name: str, storage_uri: str | Path, cfg: ServingConfig | None = None,
                 payloads: PayloadProtocol | None = None):
        super().__init__(name)
        self.storage_uri = storage_uri
        self.cfg = cfg or ServingConfig(model_name=name)
        self.payloads = payloads  # None: only GenerateRequests are answered
        self.chat: OmniChat | None = None
        self.engine: GenerationEngine | None = None
        self.text_lock = threading.Lock()  # the tokenizer, shared by the request threads (the engine has its own)
        self._wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------------------- lifecycle
    def load(self) -> bool:
        path = resolve_storage_uri(self.storage_uri)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")
        self.chat = OmniChat.load(path)
        try:
            self.engine = GenerationEngine(self.chat, self.cfg.batching)
        except ValueError as e:  # a setting this model cannot take, e.g. max_context beyond its window
            raise ValueError(f"serving.batching: {e}") from e
        self.engine.observer = PrometheusObserver(self.engine)
        self.engine.start()
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        super().stop()

    def get_input_types(self) -> list[dict]:
        return self.payloads.input_types() if self.payloads else []

    def get_output_types(self) -> list[dict]:
        return self.payloads.output_types() if self.payloads else []

    # ---------------------------------------------------------------- what the protocols ask of it
    @property
    def vocab_size(self) -> int:
        """Token ids a request may name (OpenAI's logit_bias keys) are below this."""
        return self.chat.model.llm.config.vocab_size

    def token_texts(self, token_ids: Iterable[int]) -> dict[int, tuple[str, list[int]]]:
        """Each token's text and exact UTF-8 bytes (read under the tokenizer lock: request threads share it)."""
        with self.text_lock:
            return {t: token_bytes(self.chat.tok, t) for t in set(token_ids)}

    # ------------------------------------------------------------------------------ the phases
    async def preprocess(self, payload, headers: dict | None = None) -> Prepared:
        if isinstance(payload, GenerateRequest):
            request = payload
        elif self.payloads is not None:
            request = self.payloads.read(payload, self)
        else:
            raise BadRequest(f"unsupported request type {type(payload).__name__}")
        encoded = await asyncio.to_thread(self._prepare_sync, request.conversations, request.params.max_new_tokens)
        return Prepared(request, encoded)

    async def predict(self, payload: Prepared, headers: dict | None = None, response_headers: dict | None = None
                      ) -> Prepared:
        seqs = await self.generate(payload)
        payload.completions = [Completion(s.text.strip(), s.prompt_tokens, s.completion_tokens, s.finish_reason,
                                          s.logprobs if payload.params.logprobs else None, s.cached_tokens)
                               for s in seqs]
        return payload

    async def postprocess(self, result: Prepared, headers: dict | None = None, response_headers: dict | None = None):
        return result.request.respond(result.completions)

    # ------------------------------------------------------------------------- request checks
    def max_new_tokens(self, requested, param: str) -> int:
        """The tokens to generate: `requested` (from the request field `param`) within this server's
        limit, or the configured default when the request does not say."""
        if requested is None:
            return self.cfg.max_new_tokens
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise BadRequest(f"{param}: must be a positive integer, got {requested!r}", param)
        if requested > self.cfg.limits.max_tokens:
            raise BadRequest(f"{param}: {requested} exceeds this server's limit of {self.cfg.limits.max_tokens}", param)
        return requested

    def media_reader(self) -> MediaReader:
        """Media -> model input under `serving.limits` (the same limits the Triton export carries)."""
        return MediaReader(self.chat.model.cfg, MediaLimits.of("serving.limits", self.cfg.limits))

    def check_media(self, media: list[MediaItem]) -> None:
        """Decode and check media ahead of a request (a realtime conversation item when it is added), as
        `build_chat` will: the same reader, limits and words (blocking: call from a worker thread)."""
        reader, items = self.media_reader(), _raw(media)
        try:
            reader.check_counts(items)
            for item in items:
                reader.read(item)
        except MediaError as e:
            raise BadRequest(str(e), e.item) from e

    def build_chat(self, conv: Conversation) -> ChatInput:
        """Decode and check every media item (blocking: call from a worker thread)."""
        try:
            return self.media_reader().chat_input(conv.messages, _raw(conv.media))
        except MediaError as e:  # its message names the field: "image[0] is 5000x5000 = ..."
            raise BadRequest(str(e), e.item) from e

    def _encode(self, item: ChatInput, max_new_tokens: int, param: str) -> Encoded:
        """Tokenise (checks tags vs media, audio length) and check the context window."""
        try:
            with self.text_lock:
                encoded = self.chat.processor.encode(item, add_generation_prompt=True)
        except ValueError as e:
            raise BadRequest(f"{param}: {e}", param) from e
        n, window = len(encoded.input_ids), self.engine.max_context
        if n + max_new_tokens > window:
            raise BadRequest(f"{param}: prompt is {n} tokens; with max_tokens={max_new_tokens} that exceeds the "
                             f"{window} tokens this server keeps per sequence", param)
        return encoded

    def _prepare_sync(self, convs: list[Conversation], max_new_tokens: int) -> list[Encoded]:
        items = [self.build_chat(c) for c in convs]
        return [self._encode(it, max_new_tokens, c.field) for it, c in zip(items, convs, strict=True)]

    # ---------------------------------------------------------------------------- generation
    def _submit(self, job: Prepared, sink_for) -> list[Sequence]:
        """One sequence per conversation, all or none: a full queue refuses the whole request."""
        deadline = time.monotonic() + self.cfg.limits.request_timeout_s
        seqs = [Sequence(e, job.params, deadline=deadline) for e in job.encoded]
        for i, seq in enumerate(seqs):
            seq.sink = sink_for(seq)
            try:
                self.engine.submit(seq)
            except QueueFull as e:
                for submitted in seqs[:i]:
                    submitted.cancel()
                self.engine.wake()
                raise Overloaded(str(e)) from e
        return seqs

    def _waker(self) -> LoopWaker:
        """The running loop's waker (one per loop: the server has one, tests may run several)."""
        loop = asyncio.get_running_loop()
        waker = self._wakers.get(loop)
        if waker is None:
            waker = self._wakers[loop] = LoopWaker(loop)
        return waker

    async def generate(self, job: Prepared) -> list[Sequence]:
        """Generate every conversation of the request; cancelled if the client goes away."""
        loop, waker = asyncio.get_running_loop(), self._waker()
        futures = []

        def sink_for(seq: Sequence):
            future = loop.create_future()
            futures.append(future)

            def sink(event: Event) -> None:
                if event.kind == "done":
                    waker.call(_resolve, future)

            return sink

        seqs = self._submit(job, sink_for)
        gone = client_gone()
        watch = asyncio.ensure_future(gone.wait()) if gone is not None else loop.create_future()
        finished = asyncio.gather(*futures)
        try:
            await asyncio.wait([finished, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:  # also on CancelledError: the server gave up on this request (shutdown grace exceeded)
            watch.cancel()
            if not finished.done():
                finished.cancel()
                self._cancel(seqs)
        if gone is not None and gone.is_set() and not all(s.done.is_set() for s in seqs):
            raise ClientGone()
        _raise_failures(seqs)
        return seqs

    def _cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cancel()
        self.engine.wake()

    def start_stream(self, job: Prepared) -> tuple[Sequence, asyncio.Queue]:
        """Submit the request's one conversation; its events arrive on the returned queue. Raises
        Overloaded before any response is sent, so a full queue is still a 429."""
        waker, events = self._waker(), asyncio.Queue()

        def sink_for(seq: Sequence):
            return lambda ev: waker.call(events.put_nowait, ev)

        [seq] = self._submit(job, sink_for)
        return seq, events

    async def stream(self, seq: Sequence, events: asyncio.Queue) -> AsyncIterator[Event]:
        """The sequence's events until "done"; closing the iterator early (the client went away) cancels it.
        A stream that finishes is timed as KServe's predict phase, as a request that goes through the phases is."""
        latency = kserve.metrics.PREDICT_HIST_TIME.labels(**kserve.metrics.get_labels(self.name))
        started = time.perf_counter()
        try:
            while True:
                event = await events.get()
                if event.kind == "done" and event.finish_reason not in _FAILED:
                    latency.observe(time.perf_counter() - started)
                yield event
                if event.kind == "done":
                    return
        finally:
            if not seq.done.is_set():
                self._cancel([seq])


def _raw(media: list[MediaItem]) -> list[RawMedia]:
    return [RawMedia(m.kind, m.data, m.field, m.use_audio_in_video) for m in media]


_FAILED = ("timeout", "error", "cancelled")  # finish reasons of a generation that gave no answer


class LoopWaker:
    """Calls from the engine thread into one event loop, coalesced. The engine finishes (or streams a
    token of) many sequences in one step; each `call_soon_threadsafe` writes to the loop's self-pipe,
    and that write hands the GIL to the event loop, the engine thread then waiting to get it back. So
    the calls of one burst queue here and the loop is woken once, running them in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable, tuple]] = []

    def call(self, fn: Callable, *args) -> None:
        with self._lock:
            self._pending.append((fn, args))
            if len(self._pending) > 1:
                return  # the loop is already woken for this burst
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn, args in pending:
            fn(*args)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _raise_failures(seqs: list[Sequence]) -> None:
    for seq in seqs:
        if seq.finish_reason == "timeout":
            raise DeadlineExceeded("the request did not finish within the server's deadline (limits.request_timeout_s)")
        if seq.finish_reason == "error" and isinstance(seq.error, CapacityError):
            raise OutOfCapacity(str(seq.error)) from seq.error
        if seq.finish_reason == "error" and isinstance(seq.error, torch.OutOfMemoryError):
            raise OutOfCapacity("the server ran out of accelerator memory for this request; retry later") from seq.error
        if seq.finish_reason == "error":
            raise RuntimeError("generation failed") from seq.error
