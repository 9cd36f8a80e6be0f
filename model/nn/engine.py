"""Continuous (iteration-level) batching: concurrent requests share the model one decode step at a time.

transformers' own continuous batching takes token ids only, and our prompts are spliced media
embeddings, so the engine drives the LLM itself, over a KV cache it allocates once
(`model.nn.kv_cache.SlotCache`: one slot per sequence, `max_batch_size` slots of `max_context` columns,
bounded on a GPU by its free memory):

    each step   drop cancelled and expired sequences
                -> admit waiting ones while a slot is free (a prompt that can never fit fails with
                   `CapacityError`; one that must wait for a slot waits, the queue is bounded)
                   (with `prefix_cache`, a newcomer first takes the longest cached prefix of its prompt from a
                   finished sequence's slot: model.nn.prefix_cache)
                -> the newcomers' media through the encoders, one call per kind for all of them (skipped for
                   a prompt whose media all lie in its cached prefix)
                -> one prefill chunk: up to `prefill_chunk` prompt tokens of the admitted sequences,
                   written into their own slots (a long prompt takes several steps, and the running
                   streams decode between its chunks); a finished prompt yields its first token
                -> one decode step over the running slots -> retire the finished ones, freeing slots

Admission writes only the newcomer's slot, never the running batch's cache. Decode runs over
slots[:n] (n bucketed to a power of two on CUDA, where each bucket is replayed as a CUDA graph over
static buffers; the same code runs eagerly elsewhere), samples on the device and copies the chosen
tokens to the host once per step. Positions count real tokens only and every row attends to its own
slot alone, so a greedy answer is the same in any batch as alone (tests/model/nn/test_engine.py).

Every input lands on the device of the module that reads it (`model.nn.devices`). An out-of-memory
error in a step fails the sequences of that step and the engine goes on.

The engine runs in one thread (`start`); `submit` and `Sequence.cancel` are safe from any thread.
Events go to each sequence's `sink`, called from the engine thread.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.config import EngineConfig
from model.nn.devices import llm_device, module_device, to_consumers
from model.nn.kv_cache import SlotCache, plan_slots
from model.nn.prefix_cache import PrefixCache, prompt_key
from model.nn.sampling import SamplingParams, TokenLogprob, generator_on, next_tokens
from model.text.processor import Encoded
from model.text.stream import TextStream

log = logging.getLogger(__name__)
MIN_GRAPH_WIDTH = 256  # the narrowest attention a decode graph is captured for (columns)


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound: the caller should retry later."""


class CapacityError(RuntimeError):
    """A request that can never fit the engine's KV cache (prompt + max_new_tokens > a slot's columns)."""


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
        self.slot: int | None = None  # its KV-cache slot, from admission to its end
        self.embeds: torch.Tensor | None = None  # input embeddings of prompt[cached_tokens:] until it is prefilled
        self.key = None  # what each prompt column holds (model.nn.prefix_cache.prompt_key), with the prefix cache on
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.length = 0  # columns of its slot holding keys and values
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


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, at most `limit`: the batch sizes decode graphs are captured for."""
    size = 1
    while size < n:
        size *= 2
    return min(size, limit)


class GenerationEngine:
    """`config` (model.config.EngineConfig, the serving config's `batching` section): the batch, the
    queue, the policy, the KV columns per sequence, the prefill chunk and CUDA graphs."""

    def __init__(self, chat, config: EngineConfig | None = None, observer: EngineObserver | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.processor = chat.model, chat.processor
        # The engine thread detokenises with its own copy: the tokenizer is not thread-safe, and sharing
        # one under a lock stalled every decode step behind requests being tokenised in other threads.
        self.tok = copy.deepcopy(chat.tok)
        self.llm = self.model.llm
        self.stop_ids = frozenset(chat.stop_ids)
        self.observer = observer or EngineObserver()
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, prompt not fully in the cache yet
        self.running: list[Sequence] = []  # decoding
        self.embed_device = llm_device(self.model)  # where token ids are looked up
        self.device = module_device(self.llm.model.layers[0])  # the decoder layers': cache, masks, positions
        self.kv = self._allocate(config.max_context)
        self.prefixes = PrefixCache() if config.prefix_cache else None
        use_graphs = self.device.type == "cuda" if config.cuda_graphs is None else config.cuda_graphs
        self.graphs = DecodeGraphs(self) if use_graphs and self.embed_device == self.device else None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def max_context(self) -> int:
        """Tokens (prompt + answer) one sequence may reach: the configured columns, or the LLM's window."""
        return self.config.max_context or self.llm.config.max_position_embeddings

    def _allocate(self, max_context: int | None) -> SlotCache:
        config = self.llm.config
        if max_context is not None and max_context > config.max_position_embeddings:
            raise ValueError(f"max_context={max_context} exceeds the model's context window of "
                             f"{config.max_position_embeddings} tokens (its max_position_embeddings): lower it, or "
                             f"leave it null for the whole window")
        if config._attn_implementation not in ("sdpa", "eager"):
            # Slots attend through an explicit mask, which flash-attention's kernels do not take.
            self.llm.set_attn_implementation("sdpa")
        context = self.max_context
        dtype = next(self.llm.parameters()).dtype
        slots, capacity = plan_slots(config, dtype, self.device, self.config.max_batch_size, context)
        if slots < self.config.max_batch_size or capacity < context:
            log.warning("KV cache: %d slot(s) of %d tokens fit in GPU memory (asked for %d of %d)",
                        slots, capacity, self.config.max_batch_size, context)
        return SlotCache(config, slots, capacity, self.device, dtype)

    # ----------------------------------------------------------------------------- from any thread
    def submit(self, seq: Sequence) -> Sequence:
        if self.prefixes is not None and seq.key is None:  # hashing media: in the caller's thread, not the engine's
            seq.key = prompt_key(seq.encoded, self.processor)
        with self._cond:
            if len(self.waiting) >= (limit := self.config.max_queue):
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit is {limit})")
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
                self._fail([*self.prefilling, *self.running], e)

    def _active(self) -> bool:
        return bool(self.running or self.prefilling)

    def _ready_to_step(self) -> bool:
        return self._active() or bool(self.waiting) and self._window_left(time.monotonic()) <= 0

    def _idle_wait(self) -> float | None:
        return max(self._window_left(time.monotonic()), 1e-3) if self.waiting else None

    def _window_left(self, now: float) -> float:
        """Seconds the dynamic policy still waits for more arrivals before it starts a batch."""
        if self.config.policy != "dynamic" or self._active() or len(self.waiting) >= self.config.max_batch_size \
                or not self.waiting:
            return 0.0
        return self.waiting[0].submitted + self.config.window_ms / 1000 - now

    # ------------------------------------------------------------------------------ one iteration
    def step(self) -> None:
        now = time.monotonic()
        self._expire(now)
        self._retire()
        admitted = self._admit(now)
        if admitted:
            self._embed(admitted)
        if self.prefilling:
            self._guarded(self._prefill_chunk, list(self.prefilling), "prefill")
        self._retire()
        if self.running:
            self.observer.on_step(len(self.running), len(self.waiting))
            self._guarded(self._decode, list(self.running), "decode")
            self._retire()

    def _guarded(self, forward: Callable[[], None], seqs: list[Sequence], what: str) -> None:
        """Run one forward; if it fails (out of memory, say) its sequences fail and free their slots,
        and the others go on: each sequence writes only its own slot, so nobody else's cache is touched."""
        try:
            forward()
        except Exception as e:
            log.exception("%s of %d sequence(s) failed: they fail, the engine goes on", what, len(seqs))
            self._fail(seqs, e)
            if isinstance(e, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _expire(self, now: float) -> None:
        with self._cond:
            waiting = list(self.waiting)
        for seq in [*waiting, *self.prefilling, *self.running]:
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "timeout")
        with self._cond:
            self.waiting = deque(s for s in self.waiting if s.finish_reason is None)

    def _admit(self, now: float) -> list[Sequence]:
        """Waiting sequences that get a slot, in arrival order; one that can never fit fails at once."""
        if self.config.policy == "dynamic" and self._active() or self._window_left(now) > 0:
            return []
        admitted, refused = [], []
        with self._cond:
            room = min(self.config.max_batch_size - len(self.running) - len(self.prefilling), len(self.kv.free))
            while self.waiting and len(admitted) < room:
                seq = self.waiting.popleft()
                (refused if seq.prompt_tokens + seq.params.max_new_tokens > self.kv.capacity else admitted).append(seq)
        for seq in refused:
            self._finish(seq, "error", CapacityError(
                f"the prompt is {seq.prompt_tokens} tokens; with max_tokens={seq.params.max_new_tokens} it exceeds "
                f"the {self.kv.capacity} tokens this server keeps per sequence"))
        for seq in admitted:
            self._place(seq)
            seq.stream = TextStream(self._decode_text, seq.params.stop)
        return admitted

    def _place(self, seq: Sequence) -> None:
        """A slot for an admitted sequence; with the prefix cache, the longest cached prefix of its prompt
        (all but its last token, which must run to give the first answer token) is copied in."""
        if self.prefixes is None:
            seq.slot = self.kv.allocate()
            return
        wanted = seq.prompt_tokens - 1
        match = self.prefixes.longest(seq.key, wanted)
        seq.slot = self.kv.take(self.prefixes.pick_slot(self.kv.free, match, wanted))
        if match is not None:
            if match.slot != seq.slot:
                self.kv.copy_prefix(match.slot, seq.slot, match.tokens)
            seq.length = seq.cached_tokens = match.tokens

    def _decode_text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def _embed(self, seqs: list[Sequence]) -> None:
        """The newcomers' input embeddings: every image, frame and audio window of all of them through
        its encoder in one call per kind (the collated batch), spliced into the token embeddings. A
        prompt whose media all lie in its cached prefix skips the encoders: its rest is text."""
        text_only = [s for s in seqs if s.cached_tokens and not (s.key[s.cached_tokens:] < 0).any()]
        with_media = [s for s in seqs if s not in text_only]
        try:
            if with_media:
                tensors = self.processor.collate([s.encoded for s in with_media])  # right-padded: prompts start at 0
                tensors.pop("labels")
                tensors.pop("attention_mask")
                tensors = to_consumers(self.model, tensors)
                embeds = self.model.embed(tensors.pop("input_ids"), **tensors)
                for i, seq in enumerate(with_media):
                    seq.embeds = embeds[i, seq.cached_tokens : seq.prompt_tokens].to(self.kv.dtype)
            table = self.llm.get_input_embeddings()
            for seq in text_only:
                rest = torch.tensor(seq.encoded.input_ids[seq.cached_tokens :], device=self.embed_device)
                seq.embeds = table(rest).to(self.kv.dtype)
        except Exception as e:  # e.g. out of memory or a broken medium: these requests fail, the running ones go on
            log.exception("encoding %d prompt(s) failed", len(seqs))
            self._fail(seqs, e)
            return
        self.prefilling.extend(seqs)

    def _attend(self, positions: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        """The LLM's attention masks, (rows, 1, tokens, width): a query sees its slot's columns up to its
        own position (additive: 0 or the dtype's minimum, as transformers builds them)."""
        columns = torch.arange(width, device=positions.device)
        seen = columns[None, None, :] <= positions[:, :, None]
        mask = torch.zeros(seen.shape, dtype=self.kv.dtype, device=positions.device)
        mask = mask.masked_fill(~seen, torch.finfo(self.kv.dtype).min)[:, None]
        return dict.fromkeys(set(self.llm.config.layer_types), mask)

    @torch.no_grad()
    def _prefill_chunk(self) -> None:
        """Up to `prefill_chunk` prompt tokens of the admitted sequences, in arrival order, as one
        right-padded batch writing into their own slots; a prompt that completes yields its first token."""
        budget, parts = self.config.prefill_chunk, []
        for seq in self.prefilling:
            if budget <= 0:
                break
            n = min(seq.prompt_tokens - seq.length, budget)
            parts.append((seq, seq.length, n))
            budget -= n
        width, tokens = max(start + n for _, start, n in parts), max(n for _, _, n in parts)
        embeds = torch.zeros(len(parts), tokens, parts[0][0].embeds.shape[-1], dtype=self.kv.dtype, device=self.device)
        for i, (seq, start, n) in enumerate(parts):
            embeds[i, :n] = seq.embeds[start - seq.cached_tokens : start - seq.cached_tokens + n]
        meta = torch.tensor([[seq.slot, start, n] for seq, start, n in parts], device=self.device)  # one copy in
        rows, starts, counts = meta.unbind(1)
        offsets = torch.arange(tokens, device=self.device)
        positions = starts[:, None] + offsets
        cols = torch.where(offsets < counts[:, None], positions, self.kv.trash)  # padding writes the trash column
        self.kv.set_forward(rows, cols, width)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=self._attend(positions, width),
                                position_ids=positions, cache=self.kv, use_cache=False).last_hidden_state
        done = [(i, seq) for i, (seq, start, n) in enumerate(parts) if start + n == seq.prompt_tokens]
        for seq, start, n in parts:
            seq.length = start + n
        if done:
            last = torch.tensor([parts[i][2] - 1 for i, _ in done], device=self.device)
            which = torch.tensor([i for i, _ in done], device=self.device)
            logits = self.llm.lm_head(hidden[which, last])
            seqs = [seq for _, seq in done]
            for seq in seqs:
                seq.embeds = None
                self.prefilling.remove(seq)
            self.running.extend(seqs)
            self._choose(logits, seqs, list(range(len(seqs))))

    @torch.no_grad()
    def _decode(self) -> None:
        """One token for every running sequence: the LLM over slots[:n], each row writing its own column."""
        rows = self.running
        n = max(s.slot for s in rows) + 1
        if self.graphs is not None:
            n = _bucket(n, self.kv.slots)
        tokens, positions, cols = [0] * n, [0] * n, [self.kv.trash] * n
        for s in rows:
            tokens[s.slot], positions[s.slot], cols[s.slot] = s.pending, s.length, s.length
        inputs = torch.tensor([tokens, positions, cols], device=self.device)  # one small copy to the device
        if self.graphs is not None:
            logits = self.graphs.run(n, _bucket(max(max(positions) + 1, MIN_GRAPH_WIDTH), self.kv.capacity), inputs)
        else:
            ids = None if self.embed_device == self.device else torch.tensor(tokens, device=self.embed_device)
            logits = self.decode_forward(inputs, max(positions) + 1, ids)
        for s in rows:
            s.length += 1
        self._choose(logits, rows, [s.slot for s in rows])

    def decode_forward(self, inputs: torch.Tensor, width: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(3, n) tokens, positions, columns -> (n, vocab) logits; `width` columns attended. `ids`: the
        tokens again on the embedding table's device, when that is not the decoder layers' one."""
        tokens, positions, cols = inputs[0, :, None], inputs[1, :, None], inputs[2, :, None]
        self.kv.set_forward(slice(0, inputs.shape[1]), cols, width)
        embeds = self.llm.get_input_embeddings()(tokens if ids is None else ids[:, None]).to(self.device)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=self._attend(positions, width),
                                position_ids=positions, cache=self.kv, use_cache=False).last_hidden_state
        return self.llm.lm_head(hidden[:, -1])

    def _choose(self, logits: torch.Tensor, rows: list[Sequence], index: list[int]) -> None:
        for s in rows:
            if s.counts is None and (s.params.presence_penalty or s.params.frequency_penalty):
                s.counts = torch.zeros(logits.shape[-1], device=logits.device)
            s.generator = generator_on(s.generator, logits.device)
        tokens, logprobs = next_tokens(logits, [s.params for s in rows], [s.counts for s in rows],
                                       [s.generator for s in rows], index)
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
        seq.embeds = None
        if seq.slot is not None:  # free at once; the sequence leaves the batch lists before the next forward
            self.kv.release(seq.slot)
            if self.prefixes is not None and reason != "error":  # a failed forward may leave columns half-written
                self.prefixes.keep(seq.slot, self._columns_key(seq))
            seq.slot = None
        rest = seq.stream.finish() if seq.stream is not None else ""
        try:  # counted before the answer goes out: a client that has it finds it in the metrics
            self.observer.on_finish(seq)
        except Exception:  # metrics never fail a request
            log.exception("the engine observer failed on a finished sequence")
        try:
            seq.emit(Event("done", rest, finish_reason=reason, error=error))
        finally:
            seq.done.set()

    def _columns_key(self, seq: Sequence) -> np.ndarray:
        """What the columns of the sequence's slot hold: its prompt, then the answer tokens fed back by
        decode (column prompt + i holds answer token i; the last chosen token was never fed)."""
        answer = seq.stream.ids[: max(seq.length - seq.prompt_tokens, 0)] if seq.stream is not None else []
        return np.concatenate([seq.key[: seq.length], np.asarray(answer, dtype=np.int64)])

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            self._finish(seq, "error", error)
        self._retire()

    def _retire(self) -> None:
        """Drop finished sequences from the batch (their slots were freed as they finished; nothing is copied)."""
        self.prefilling[:] = [s for s in self.prefilling if s.finish_reason is None]
        self.running[:] = [s for s in self.running if s.finish_reason is None]


class DecodeGraphs:
    """Decode as CUDA graphs, one per (rows, columns) bucket, both powers of two, over static inputs: a
    step is one copy in, one replay, and the logits read from the graph's own output. A bucket whose
    capture fails runs eagerly (logged), so a model with an op CUDA graphs cannot hold still serves."""

    def __init__(self, engine: GenerationEngine):
        self.engine = engine
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.failed: set[tuple[int, int]] = set()
        self.pool = None

    def run(self, n: int, width: int, inputs: torch.Tensor) -> torch.Tensor:
        key = (n, width)
        if key in self.failed:
            return self.engine.decode_forward(inputs, width)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(n, width)
            except Exception:  # e.g. an op that cannot be captured: this bucket runs eagerly
                log.exception("capturing the decode graph for %d rows x %d columns failed; running it eagerly",
                              n, width)
                self.failed.add(key)
                return self.engine.decode_forward(inputs, width)
        graph, static_inputs, logits = self.graphs[key]
        static_inputs.copy_(inputs)
        graph.replay()
        return logits

    def _capture(self, n: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        engine = self.engine
        static_inputs = torch.zeros(3, n, dtype=torch.long, device=engine.device)
        static_inputs[2] = engine.kv.trash  # warm-up and capture write only the trash column
        stream = torch.cuda.Stream(engine.device)
        stream.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                engine.decode_forward(static_inputs, width)
        torch.cuda.current_stream(engine.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            logits = engine.decode_forward(static_inputs, width)
        self.pool = graph.pool()
        return graph, static_inputs, logits
