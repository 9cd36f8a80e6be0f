"""The KServe predictor: loads a checkpoint and answers conversations, in KServe's request phases.

    preprocess   a request (v2 `InferRequest`, v1 dict, or `ChatRequest` from the OpenAI route) ->
                 conversations -> media decoded and checked against the serving limits -> tokenised
    predict      one `Sequence` per conversation, submitted to the generation engine, awaited
    postprocess  the protocol's response: a v2 `InferResponse`, v1 `{"predictions"}`, or the
                 `Completion`s the OpenAI route renders

`OmniPredictor` is a `kserve.Model`, so KServe gives it health, metadata, Prometheus latency
metrics per phase and the v1/v2 REST endpoints (`serving.protocol.v2` has the tensor layout).

Generation is `model.nn.engine.GenerationEngine` in its own thread: requests that arrive together
are decoded as one batch, a newcomer joining between decode steps (continuous batching). Its queue
is bounded (`batching.max_queue`): beyond it a request gets `Overloaded` (429 with Retry-After).
Every request has a deadline (`limits.request_timeout_s`: `DeadlineExceeded`, 503), and a client
that disconnects cancels its sequences (`serving.http.client_gone`).

Every client mistake raises `BadRequest` (kserve's `InvalidInput`, so the routes answer 400) with a
message naming the field. Media decoding and tokenising run in worker threads, so the event loop
stays free for health checks; the tokenizer is shared with the engine under one lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import kserve

from model.media.decode import MediaError
from model.media.inputs import MediaReader, RawMedia
from model.media.limits import MediaLimits
from model.nn.checkpoint import CONFIG_FILE
from model.nn.engine import Event, GenerationEngine, QueueFull, Sequence
from model.nn.generation import OmniChat
from model.nn.sampling import SamplingParams, TokenLogprob
from model.text.processor import ChatInput, Encoded
from serving.config import ServingConfig, resolve_storage_uri
from serving.conversation import BadRequest, Completion, Conversation
from serving.http import client_gone
from serving.metrics import PrometheusObserver
from serving.protocol import v2
from serving.protocol.v2 import V2_INPUTS, V2_OUTPUT

RETRY_AFTER_S = 1


class Overloaded(Exception):
    """The engine's queue is full: 429 with Retry-After."""


class DeadlineExceeded(Exception):
    """The request did not finish within limits.request_timeout_s: 503 with Retry-After."""


class ClientGone(Exception):
    """The client disconnected; its generation was cancelled and nobody reads the answer."""


@dataclass
class ChatRequest:
    """What the OpenAI route hands to the predictor: one conversation and how to sample its answer."""

    conversation: Conversation
    params: SamplingParams


@dataclass
class Prepared:
    """A request after preprocess: decoded, tokenised, ready to generate."""

    protocol: str  # "v2" | "v1" | "chat"
    encoded: list[Encoded]
    params: SamplingParams
    request: object = None  # the v2 InferRequest, for the response's id and output settings
    completions: list[Completion] = field(default_factory=list)  # filled by predict

    @property
    def prompt_tokens(self) -> list[int]:
        return [len(e.input_ids) for e in self.encoded]


class OmniPredictor(kserve.Model):
    def __init__(self, name: str, storage_uri: str | Path, cfg: ServingConfig | None = None):
        super().__init__(name)
        self.storage_uri = storage_uri
        self.cfg = cfg or ServingConfig(model_name=name)
        self.chat: OmniChat | None = None
        self.engine: GenerationEngine | None = None
        self.text_lock = threading.Lock()  # the tokenizer, shared by request threads and the engine

    # ------------------------------------------------------------------------------- lifecycle
    def load(self) -> bool:
        path = resolve_storage_uri(self.storage_uri)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")
        self.chat = OmniChat.load(path)
        b = self.cfg.batching
        self.engine = GenerationEngine(self.chat, max_batch=b.max_batch_size, max_queue=b.max_queue, policy=b.policy,
                                       window_s=b.window_ms / 1000, text_lock=self.text_lock)
        self.engine.observer = PrometheusObserver(self.engine)
        self.engine.start()
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        super().stop()

    def get_input_types(self) -> list[dict]:
        return [{"name": name, "datatype": "BYTES", "shape": [-1]} for name in V2_INPUTS]

    def get_output_types(self) -> list[dict]:
        return [{"name": V2_OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    # ------------------------------------------------------------------------------ the phases
    async def preprocess(self, payload, headers: dict | None = None) -> Prepared:
        if isinstance(payload, ChatRequest):
            protocol, convs, params, request = "chat", [payload.conversation], payload.params, None
        elif isinstance(payload, kserve.InferRequest):
            params = self.greedy(v2.parameters(payload.parameters))
            protocol, convs, request = "v2", v2.rows(v2.v2_columns(payload), self.cfg.limits.max_batch_size), payload
        elif isinstance(payload, dict):
            params = self.greedy(v2.parameters(payload.get("parameters")))
            protocol, convs, request = "v1", v2.rows(v2.v1_columns(payload), self.cfg.limits.max_batch_size), None
        else:
            raise BadRequest(f"unsupported request type {type(payload).__name__}")
        encoded = await asyncio.to_thread(self._prepare_sync, convs, params.max_new_tokens)
        return Prepared(protocol, encoded, params, request)

    async def predict(self, payload: Prepared, headers: dict | None = None, response_headers: dict | None = None
                      ) -> Prepared:
        seqs = await self.generate(payload)
        payload.completions = [Completion(s.text.strip(), s.prompt_tokens, s.completion_tokens, s.finish_reason,
                                          s.logprobs if payload.params.logprobs else None) for s in seqs]
        return payload

    async def postprocess(self, result: Prepared, headers: dict | None = None, response_headers: dict | None = None):
        texts = [c.text for c in result.completions]
        if result.protocol == "v2":
            return v2.infer_response(result.request, self.name, texts)
        if result.protocol == "v1":
            return {"predictions": texts}
        return result.completions

    # ------------------------------------------------------------------------- request checks
    def greedy(self, params: dict) -> SamplingParams:
        """v1/v2 requests: greedy, with the `max_new_tokens` parameter (Triton's entry model does the same)."""
        return SamplingParams(max_new_tokens=self.max_new_tokens(params.get("max_new_tokens"), "max_new_tokens"))

    def max_new_tokens(self, requested, param: str) -> int:
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

    def build_chat(self, conv: Conversation) -> ChatInput:
        """Decode and check every media item (blocking: call from a worker thread)."""
        media = [RawMedia(m.kind, m.data, m.field, m.use_audio_in_video) for m in conv.media]
        try:
            return self.media_reader().chat_input(conv.messages, media)
        except MediaError as e:  # its message names the field: "image[0] is 5000x5000 = ..."
            raise BadRequest(str(e), e.item) from e

    def _encode(self, item: ChatInput, max_new_tokens: int, param: str) -> Encoded:
        """Tokenise (checks tags vs media, audio length) and check the context window."""
        try:
            with self.text_lock:
                encoded = self.chat.processor.encode(item, add_generation_prompt=True)
        except ValueError as e:
            raise BadRequest(f"{param}: {e}", param) from e
        n, window = len(encoded.input_ids), self.chat.model.cfg.llm.max_position_embeddings
        if n + max_new_tokens > window:
            raise BadRequest(f"{param}: prompt is {n} tokens; with max_tokens={max_new_tokens} that exceeds the "
                             f"model's context of {window}", param)
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

    async def generate(self, job: Prepared) -> list[Sequence]:
        """Generate every conversation of the request; cancelled if the client goes away."""
        loop = asyncio.get_running_loop()
        futures = []

        def sink_for(seq: Sequence):
            future = loop.create_future()
            futures.append(future)

            def sink(event: Event) -> None:
                if event.kind == "done":
                    loop.call_soon_threadsafe(_resolve, future)

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

    def logprob_entries(self, logprobs: list[TokenLogprob]) -> list[dict]:
        with self.text_lock:
            return [token_entry(self.chat.tok, lp) for lp in logprobs]

    def _cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cancel()
        self.engine.wake()

    def start_stream(self, job: Prepared) -> tuple[Sequence, asyncio.Queue]:
        """Submit the request's one conversation; its events arrive on the returned queue. Raises
        Overloaded before any response is sent, so a full queue is still a 429."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink_for(seq: Sequence):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)

        [seq] = self._submit(job, sink_for)
        return seq, events

    async def stream(self, seq: Sequence, events: asyncio.Queue) -> AsyncIterator[Event]:
        """The sequence's events until "done"; closing the iterator early (the client went away) cancels it."""
        try:
            while True:
                event = await events.get()
                yield event
                if event.kind == "done":
                    return
        finally:
            if not seq.done.is_set():
                self._cancel([seq])


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _raise_failures(seqs: list[Sequence]) -> None:
    for seq in seqs:
        if seq.finish_reason == "timeout":
            raise DeadlineExceeded("the request did not finish within the server's deadline (limits.request_timeout_s)")
        if seq.finish_reason == "error":
            raise RuntimeError("generation failed") from seq.error


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's table), reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


_BYTES = _byte_decoder()


def token_bytes(tok, token_id: int) -> tuple[str, list[int]]:
    """A token's text and its exact UTF-8 bytes (a byte-level token may hold part of a character)."""
    piece = tok.convert_ids_to_tokens(token_id) or ""
    if piece and all(ch in _BYTES for ch in piece):
        raw = bytes(_BYTES[ch] for ch in piece)
        return raw.decode("utf-8", errors="replace"), list(raw)
    text = tok.decode([token_id])
    return text, list(text.encode("utf-8"))


def token_entry(tok, lp: TokenLogprob) -> dict:
    """OpenAI's logprobs.content item for one generated token: text, logprob, bytes, the top list."""

    def one(token_id: int, logprob: float) -> dict:
        text, raw = token_bytes(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {**one(lp.token_id, lp.logprob), "top_logprobs": [one(t, p) for t, p in lp.top]}
