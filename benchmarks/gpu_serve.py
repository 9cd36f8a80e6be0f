"""The serving part of `make bench-gpu`: the generation engine on a model built from a named size.

    python -m benchmarks.bench_gpu --size 1.5b --part serve

Records (`emit`, one JSON line each):
- `serve`: N concurrent streams (1, 8, 32, 64) of a text question, each answer exactly `new_tokens`
  long (the stop tokens are switched off so runs compare): tokens/s over the whole round, time to
  first token p50/p95, peak accelerator memory (null on a CPU);
- `serve_ttft`: time to first token p50/p95 for an image question and for an audio question, one
  request at a time;
- `serve_reference`: Hugging Face `generate` on the same N prompts as one batch, tokens/s.

The engine runs with the serving config's `batching` section (conf/serving: batch, queue, context,
prefill chunk, CUDA graphs), widened to 64 slots for the widest round, and its prefix cache off: the
rounds repeat their prompts (the warm-up's, the same question asked again), and a cached prompt would
skip the prefill that time to first token measures.

Fresh weights (nothing is downloaded) and a tokenizer trained on a few words; the LLM keeps its
full vocabulary, so the LM head costs what it costs. `tiny` on a CPU is the CI smoke: fewer new
tokens, the same records.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from benchmarks.gpu_sizes import size_config
from components.config import load_config
from model import runtime
from model.config import EngineConfig
from model.nn.engine import GenerationEngine, Sequence
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.nn.sampling import SamplingParams
from model.text.processor import ChatInput, OmniProcessor
from model.text.tokenizer import train_tokenizer

STREAMS = (1, 8, 32, 64)
WORDS = "what color is the shape red green blue yellow describe transcribe the audio one two three A B C D"
CONTEXT = {"tiny": 1024, "1.5b": 4096, "7b": 4096}  # KV columns per stream


def build_chat(size: str) -> OmniChat:
    """Fresh weights, built straight on this process's device and cast to its dtype."""
    cfg = size_config(size)
    tok = train_tokenizer([WORDS] * 20, 400)
    processor = OmniProcessor(tok, cfg)
    torch.manual_seed(0)
    with torch.device(runtime.device()):
        model = OmniModel(cfg, len(tok) if size == "tiny" else cfg.tokenizer.vocab_size, processor.placeholder_ids)
    return OmniChat(runtime.place(model).eval(), processor)


def _image(seed: int, side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


def _audio(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * math.pi * 330 * t)).astype(np.float32)


def text_question(i: int) -> ChatInput:
    words = WORDS.split()
    return ChatInput([{"role": "user", "content": " ".join(words[(i + j) % len(words)] for j in range(24))}])


def _ms(values: list[float]) -> tuple[float, float]:
    """p50 and p95, in milliseconds."""
    values = sorted(values)
    p95 = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
    return round(statistics.median(values) * 1000, 1), round(p95 * 1000, 1)


def _round(engine: GenerationEngine, chat: OmniChat, items: list[ChatInput], new_tokens: int
           ) -> tuple[float, list[Sequence]]:
    params = SamplingParams(max_new_tokens=new_tokens)
    seqs = [Sequence(chat.processor.encode(it, add_generation_prompt=True), params) for it in items]
    start = time.perf_counter()
    for s in seqs:
        engine.submit(s)
    for s in seqs:
        s.done.wait()
    return time.perf_counter() - start, seqs


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def streams(engine: GenerationEngine, chat: OmniChat, emit: Callable[..., dict], new_tokens: int) -> list[dict]:
    rows = []
    for n in STREAMS:
        items = [text_question(i) for i in range(n)]
        _round(engine, chat, items, 2)  # warm: this batch size's first steps (and CUDA graphs) outside the clock
        _peak_reset()
        seconds, seqs = _round(engine, chat, items, new_tokens)
        failed = [s.error for s in seqs if s.finish_reason != "length"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {n} streams failed: {failed[0]!r}")
        p50, p95 = _ms([s.first_token_at - s.submitted for s in seqs])
        rows.append(emit("serve", streams=n, new_tokens=new_tokens, tokens_per_s=round(n * new_tokens / seconds, 1),
                         ttft_p50_ms=p50, ttft_p95_ms=p95, peak_mem_gib=_peak_gib(), seconds=round(seconds, 2)))
    return rows


def media_ttft(engine: GenerationEngine, chat: OmniChat, emit: Callable[..., dict], reps: int) -> list[dict]:
    side = chat.model.cfg.vision.image_size
    questions = {
        "image": lambda i: ChatInput([{"role": "user", "content": "<image>describe"}], images=[_image(i, side)]),
        "audio": lambda i: ChatInput([{"role": "user", "content": "<audio>transcribe the audio"}],
                                     audios=[_audio(2.0)]),
    }
    rows = []
    for media, question in questions.items():
        _round(engine, chat, [question(0)], 1)
        ttfts = [_round(engine, chat, [question(i)], 1)[1][0] for i in range(reps)]
        p50, p95 = _ms([s.first_token_at - s.submitted for s in ttfts])
        rows.append(emit("serve_ttft", media=media, streams=1, requests=reps, ttft_p50_ms=p50, ttft_p95_ms=p95))
    return rows


@torch.no_grad()
def reference(chat: OmniChat, emit: Callable[..., dict], new_tokens: int) -> list[dict]:
    """transformers' `generate` on the same prompts, all N in one batch."""
    rows = []
    for n in STREAMS:
        inputs = chat._inputs([text_question(i) for i in range(n)])
        _peak_reset()
        start = time.perf_counter()
        chat.model.llm.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=chat.tok.pad_token_id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(emit("serve_reference", streams=n, new_tokens=new_tokens,
                         tokens_per_s=round(n * new_tokens / seconds, 1), peak_mem_gib=_peak_gib()))
    return rows


def engine_config(size: str, overrides: list[str] | None = None) -> EngineConfig:
    """The served engine's settings: the config tree's `serving.batching` (what `omni serve` and the
    predictor read, with `overrides` such as `serving.batching.prefill_chunk=1024`), with room for this
    benchmark's widest round and, where the tree leaves it null, the size's context."""
    batching = load_config(overrides).serving.batching
    return EngineConfig.model_validate({
        **batching.model_dump(), "max_batch_size": max(batching.max_batch_size, max(STREAMS)),
        "max_queue": max(batching.max_queue, 4 * max(STREAMS)), "max_context": batching.max_context or CONTEXT[size],
        "prefix_cache": False})


def run(size: str, emit: Callable[..., dict], overrides: list[str] | None = None) -> list[dict]:
    """Every serving record for `size` (see the module doc); `emit` prints one and returns it."""
    on_gpu = runtime.device().type == "cuda"
    new_tokens = 128 if on_gpu or size != "tiny" else 8
    config = engine_config(size, overrides)
    chat = build_chat(size)
    chat.stop_ids = []  # answers run to their length: every round decodes the same number of tokens
    engine = GenerationEngine(chat, config)
    engine.start()
    try:
        rows = streams(engine, chat, emit, new_tokens)
        rows += media_ttft(engine, chat, emit, reps=20 if on_gpu else 5)
    finally:
        engine.stop()
    return rows + reference(chat, emit, new_tokens)
