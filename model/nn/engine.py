"""Continuous (iteration-level) batching: concurrent requests share the model one decode step at a time.

transformers' own continuous batching takes token ids only, and our prompts are spliced media
embeddings, so the engine drives the LLM itself with a KV cache it owns:

    each step   drop cancelled and expired sequences -> admit waiting ones (up to `max_batch`)
                -> prefill the newcomers together (media encoders + LLM over their prompts, left-padded)
                -> merge their cache into the running batch (left-padding the shorter side)
                -> one decode step for every running sequence -> retire the finished ones

A new request waits at most one decode step to join, and a finished one leaves at once, so short
answers are not held back by long ones (the `dynamic` policy, kept for comparison, admits only into
an empty batch after a short window). Padding is masked and positions count real tokens only, as in
`generate`, so a greedy answer is the same in any batch as alone (tests/model/nn/test_engine.py).
Leading columns that no running sequence uses any more are trimmed when sequences leave.

The engine runs in one thread (`start`); `submit` and `Sequence.cancel` are safe from any thread.
Events go to each sequence's `sink`, called from the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from model.nn.sampling import SamplingParams, TokenLogprob, next_tokens
from model.text.processor import Encoded
from model.text.stream import TextStream

log = logging.getLogger(__name__)
POLICIES = ("continuous", "dynamic")


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound: the caller should retry later."""


@dataclass
class Event:
    kind: str  # "token" (text may be empty while a stop string or a UTF-8 character is pending) | "done"
    text: str = ""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    error: BaseException | None = None


class Sequence:
    """One conversation to answer: its prompt, its sampling, and its state while it generates."""

    def __init__(self, encoded: Encoded, params: SamplingParams, sink: Callable[[Event], None] | None = None,
                 deadline: float | None = None):
        self.encoded, self.params, self.sink, self.deadline = encoded, params, sink, deadline
        self.prompt_tokens = len(encoded.input_ids)
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.generator = params.generator()
        self.counts: torch.Tensor | None = None  # per-token counts, for the penalties
        self.stream: TextStream | None = None
        self.logprobs: list[TokenLogprob] = []
        self.pending = -1  # the last chosen token, fed to the next decode step
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()

    def cancel(self) -> None:
        """Stop generating (the engine notices before its next step)."""
        self.cancelled = True

    @property
    def text(self) -> str:
        return self.stream.text if self.stream else ""

    @property
    def completion_tokens(self) -> int:
        return len(self.stream.ids) if self.stream else 0

    def emit(self, event: Event) -> None:
        if self.sink is not None:
            self.sink(event)


class EngineObserver:
    """Hooks for metrics (serving implements them with Prometheus); every call comes from the engine thread."""

    def on_step(self, batch_size: int, waiting: int) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_finish(self, seq: Sequence) -> None: ...


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [width - t.shape[dim], 0]
    return F.pad(t, pad)


class GenerationEngine:
    def __init__(self, chat, max_batch: int = 8, max_queue: int = 64, policy: str = "continuous",
                 window_s: float = 0.0, observer: EngineObserver | None = None, text_lock=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.model, self.processor, self.tok = chat.model, chat.processor, chat.tok
        self.stop_ids = frozenset(chat.stop_ids)
        self.max_batch, self.max_queue, self.policy, self.window_s = max_batch, max_queue, policy, window_s
        self.observer = observer or EngineObserver()
        self.text_lock = text_lock or threading.Lock()  # the tokenizer is not thread-safe
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (running, cache length): 1 where a row has a real token
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----------------------------------------------------------------------------- from any thread
    def submit(self, seq: Sequence) -> Sequence:
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit is {self.max_queue})")
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="omni-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_until_done(self, seqs: list[Sequence]) -> list[Sequence]:
        """Submit and step in the calling thread until every one is done (no engine thread running)."""
        for s in seqs:
            self.submit(s)
        while not all(s.done.is_set() for s in seqs):
            self.step()
        return seqs

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._ready_to_step():
                    self._cond.wait(self._idle_wait())
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # never let the thread die: fail what was running and go on
                log.exception("generation step failed")
                self._fail(list(self.running), e)

    def _ready_to_step(self) -> bool:
        return bool(self.running) or bool(self.waiting) and self._window_left(time.monotonic()) <= 0

    def _idle_wait(self) -> float | None:
        return max(self._window_left(time.monotonic()), 1e-3) if self.waiting else None

    def _window_left(self, now: float) -> float:
        """Seconds the dynamic policy still waits for more arrivals before it starts a batch."""
        if self.policy != "dynamic" or self.running or len(self.waiting) >= self.max_batch or not self.waiting:
            return 0.0
        return self.waiting[0].submitted + self.window_s - now

    # ------------------------------------------------------------------------------ one iteration
    def step(self) -> None:
        now = time.monotonic()
        self._expire(now)
        admitted = self._admit(now)
        if admitted:
            self._prefill(admitted)
        self._retire()
        if self.running:
            self.observer.on_step(len(self.running), len(self.waiting))
            self._decode()
            self._retire()

    def _expire(self, now: float) -> None:
        with self._cond:
            waiting = list(self.waiting)
        for seq in [*waiting, *self.running]:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "timeout")
        with self._cond:
            self.waiting = deque(s for s in self.waiting if s.finish_reason is None)

    def _admit(self, now: float) -> list[Sequence]:
        if self.policy == "dynamic" and self.running or self._window_left(now) > 0:
            return []
        with self._cond:
            room = self.max_batch - len(self.running)
            admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        for seq in admitted:
            seq.stream = TextStream(self._decode_text, seq.params.stop)
        return admitted

    def _decode_text(self, ids: list[int]) -> str:
        with self.text_lock:
            return self.tok.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def _prefill(self, seqs: list[Sequence]) -> None:
        """The newcomers' prompts through the encoders and the LLM, in one left-padded batch."""
        try:
            tensors = self.processor.collate([s.encoded for s in seqs], left_pad=True)
            tensors.pop("labels")
            ids, mask = tensors.pop("input_ids"), tensors.pop("attention_mask")
            embeds = self.model.embed(ids, **tensors)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            cache = DynamicCache(config=self.model.llm.config)
            out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                                 use_cache=True, logits_to_keep=1)
        except Exception as e:  # e.g. out of memory: these requests fail, the running ones go on
            log.exception("prefill of %d sequence(s) failed", len(seqs))
            self._fail(seqs, e)
            return
        self._merge(cache, mask, seqs)
        self._choose(out.logits[:, -1], seqs)

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, seqs: list[Sequence]) -> None:
        if not self.running:
            self.cache, self.mask, self.running = cache, mask, list(seqs)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.running.extend(seqs)

    @torch.no_grad()
    def _decode(self) -> None:
        rows = self.running
        tokens = torch.tensor([[s.pending] for s in rows])
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        out = self.model.llm(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                             cache=self.cache, use_cache=True)
        self._choose(out.logits[:, -1], rows)

    def _choose(self, logits: torch.Tensor, rows: list[Sequence]) -> None:
        for s in rows:
            if s.counts is None and (s.params.presence_penalty or s.params.frequency_penalty):
                s.counts = torch.zeros(logits.shape[-1])
        tokens, logprobs = next_tokens(logits, [s.params for s in rows], [s.counts for s in rows],
                                       [s.generator for s in rows])
        now = time.monotonic()
        for seq, token, logprob in zip(rows, tokens, logprobs, strict=True):
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.observer.on_first_token(now - seq.submitted)
            self._advance(seq, token, logprob)

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        if seq.finish_reason is not None:  # cancelled between the forward and now
            return
        if token in self.stop_ids:
            self._finish(seq, "stop")
            return
        seq.pending = token
        if seq.counts is not None:
            seq.counts[token] += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.emit(Event("token", seq.stream.push(token), logprob))
        if seq.stream.stopped:
            self._finish(seq, "stop")
        elif seq.completion_tokens >= seq.params.max_new_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason, seq.error = reason, error
        rest = seq.stream.finish() if seq.stream is not None else ""
        try:
            seq.emit(Event("done", rest, finish_reason=reason, error=error))
        finally:
            seq.done.set()
            self.observer.on_finish(seq)

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            self._finish(seq, "error", error)
        if any(s in self.running for s in seqs):
            self._retire()

    def _retire(self) -> None:
        """Drop finished rows from the batch, and the leading cache columns nobody uses any more."""
        keep = [i for i, s in enumerate(self.running) if s.finish_reason is None]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep)
        used = self.mask[index].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        self.mask = self.mask[index, start:]
