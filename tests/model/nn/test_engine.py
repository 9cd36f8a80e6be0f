"""The continuous-batching engine against `OmniChat.generate` (transformers' generate, one request
alone): greedy answers equal in any batch, with requests joining mid-flight and leaving early;
seeded sampling reproducible; stop strings, penalties, bias, logprobs; queue bound, cancel, deadline."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import EngineConfig
from model.nn.engine import CapacityError, Event, GenerationEngine, QueueFull, Sequence
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.nn.sampling import SamplingParams, adjust, draw
from model.text.processor import ChatInput, OmniProcessor
from model.text.stream import TextStream


@pytest.fixture(scope="module")
def chat(tiny_cfg, tokenizer) -> OmniChat:
    processor = OmniProcessor(tokenizer, tiny_cfg)
    torch.manual_seed(0)
    return OmniChat(OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids), processor)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def _audio(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * math.pi * 330 * t)).astype(np.float32)


def conversations() -> list[ChatInput]:
    """Prompts of different lengths and media, so batches really pad."""
    return [
        ChatInput([{"role": "user", "content": "what color is the shape"}]),
        ChatInput([{"role": "user", "content": "<image>describe"}], images=[_image(1)]),
        ChatInput([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
        ChatInput([{"role": "user", "content": "<audio>transcribe the audio"}], audios=[_audio(1.2)]),
        ChatInput([{"role": "user", "content": "<image>one"}, {"role": "assistant", "content": "red"},
                   {"role": "user", "content": "and <image> two?"}], images=[_image(2), _image(3)]),
    ]


def _seq(chat: OmniChat, item: ChatInput, **params) -> Sequence:
    return Sequence(chat.processor.encode(item, add_generation_prompt=True), SamplingParams(**params))


def test_greedy_answers_in_a_batch_equal_each_alone(chat):
    items = conversations()
    alone = [chat.generate([item], max_new_tokens=12)[0] for item in items]
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=8))
    together = engine.run_until_done([_seq(chat, it, max_new_tokens=12) for it in items])
    assert [s.text.strip() for s in together] == alone
    assert all(s.finish_reason in ("stop", "length") for s in together)


def test_requests_joining_and_leaving_mid_flight_get_the_same_answers(chat):
    """Short answers leave, newcomers join between decode steps: slots are taken and freed."""
    items = conversations()
    budgets = [3, 14, 6, 10, 8]
    alone = [chat.generate([it], max_new_tokens=n)[0] for it, n in zip(items, budgets, strict=True)]
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=3))  # fewer slots than requests: some must wait
    seqs = [_seq(chat, it, max_new_tokens=n) for it, n in zip(items, budgets, strict=True)]
    engine.submit(seqs[0])
    engine.submit(seqs[1])
    engine.step()
    engine.step()
    sizes = []
    for s in seqs[2:]:
        engine.submit(s)
        engine.step()
        sizes.append(len(engine.running))
    while not all(s.done.is_set() for s in seqs):
        engine.step()
        sizes.append(len(engine.running))
    assert max(sizes) == 3 and engine.kv.used == 0 and not engine.running and not engine.prefilling
    assert [s.text.strip() for s in seqs] == alone


def test_dynamic_policy_gives_the_same_answers(chat):
    items = conversations()[:3]
    alone = [chat.generate([it], max_new_tokens=6)[0] for it in items]
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=8, policy="dynamic", window_ms=0.0))
    assert [s.text.strip() for s in engine.run_until_done([_seq(chat, it, max_new_tokens=6) for it in items])] == alone


def test_seeded_sampling_is_reproducible_in_any_batch(chat):
    item = conversations()[1]
    params = {"max_new_tokens": 16, "temperature": 1.3, "top_p": 0.95, "top_k": 50, "seed": 7}
    engine = GenerationEngine(chat)
    [alone] = engine.run_until_done([_seq(chat, item, **params)])
    batch = engine.run_until_done([_seq(chat, conversations()[0], max_new_tokens=9), _seq(chat, item, **params),
                                   _seq(chat, item, **{**params, "seed": 8})])
    assert batch[1].stream.ids == alone.stream.ids
    assert batch[2].stream.ids != alone.stream.ids  # another seed, another answer
    greedy = engine.run_until_done([_seq(chat, item, max_new_tokens=16)])[0]
    assert alone.stream.ids != greedy.stream.ids


def test_logit_bias_penalties_and_logprobs(chat):
    item = conversations()[0]
    engine = GenerationEngine(chat)
    [plain] = engine.run_until_done([_seq(chat, item, max_new_tokens=8, logprobs=True, top_logprobs=3)])
    first = plain.stream.ids[0]
    assert len(plain.logprobs) == plain.completion_tokens
    lp = plain.logprobs[0]
    assert lp.token_id == first and [t for t, _ in lp.top][0] == first and len(lp.top) == 3
    assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    [banned] = engine.run_until_done([_seq(chat, item, max_new_tokens=8, logit_bias={first: -100.0})])
    assert banned.stream.ids[0] != first
    [penalised] = engine.run_until_done([_seq(chat, item, max_new_tokens=24, frequency_penalty=2.0,
                                              presence_penalty=2.0)])
    counts = np.bincount(penalised.stream.ids)
    assert counts.max() <= np.bincount(plain.stream.ids).max() or penalised.stream.ids != plain.stream.ids


def test_penalties_and_top_k_top_p_on_logits():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    counts = torch.tensor([2.0, 0.0, 0.0, 0.0])
    out = adjust(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, logit_bias={3: 5.0}), counts)
    assert out.tolist() == [3.0 - 2.0 - 0.5, 2.0, 1.0, 5.0]
    gen = torch.Generator().manual_seed(0)
    draws = {draw(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)}
    assert draws == {0, 1}
    draws = {draw(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(200)}
    assert draws == {0}  # the top token alone holds > 50% of the mass


def test_stop_strings_end_the_answer_before_them(chat):
    item = conversations()[2]
    engine = GenerationEngine(chat)
    [full] = engine.run_until_done([_seq(chat, item, max_new_tokens=16)])
    text = full.text
    stop = text[3:5] if len(text) >= 5 else text[-1:]
    assert stop, "the model answered nothing; pick another prompt"
    events: list[Event] = []
    seq = _seq(chat, item, max_new_tokens=16, stop=(stop,))
    seq.sink = events.append
    engine.run_until_done([seq])
    assert seq.finish_reason == "stop" and seq.text == text[: text.find(stop)]
    assert "".join(e.text for e in events) == seq.text  # streamed deltas never show the stop string


def test_text_stream_holds_back_partial_stops_and_characters():
    pieces = {1: "ab", 2: "c", 3: "\ufffd", 4: "d", 5: "END", 6: "x"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids).replace("\ufffdd", "é"), stop=("cE",))
    assert stream.push(1) == "ab"
    assert stream.push(2) == ""  # "c" may start "cE"
    assert stream.push(3) == "c"  # not a stop after all; the incomplete character waits
    assert stream.push(4) == "é"
    assert stream.push(6) == "x" and stream.finish() == ""
    stop = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("cE",))
    assert [stop.push(i) for i in (1, 2, 5)] == ["ab", "", ""] and stop.stopped and stop.text == "ab"


def test_queue_bound_cancel_and_deadline(chat):
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=1, max_queue=2))
    a, b = _seq(chat, conversations()[0], max_new_tokens=50), _seq(chat, conversations()[2], max_new_tokens=50)
    engine.submit(a)
    engine.submit(b)
    with pytest.raises(QueueFull, match="limit is 2"):
        engine.submit(_seq(chat, conversations()[0]))
    engine.step()  # a runs, b waits
    b.deadline = time.monotonic() - 1
    a.cancel()
    engine.step()
    assert a.finish_reason == "cancelled" and b.finish_reason == "timeout"
    assert a.completion_tokens < 50 and not engine.running and not engine.waiting


def test_engine_thread_serves_concurrent_submissions(chat):
    items = conversations()
    alone = [chat.generate([it], max_new_tokens=6)[0] for it in items]
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=8))
    engine.start()
    try:
        seqs = [engine.submit(_seq(chat, it, max_new_tokens=6)) for it in items]
        assert all(s.done.wait(60) for s in seqs)
    finally:
        engine.stop()
    assert [s.text.strip() for s in seqs] == alone


def test_chunked_prefill_gives_the_same_answers_and_running_streams_go_on(chat):
    """A long prompt prefilled a few tokens per step while another stream decodes between its chunks."""
    items = conversations()
    alone = [chat.generate([it], max_new_tokens=8)[0] for it in items[:2]]
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=4, prefill_chunk=5))
    short, long_ = _seq(chat, items[0], max_new_tokens=8), _seq(chat, items[1], max_new_tokens=8)
    engine.run_until_done([short])  # warm: the short one alone first
    short = _seq(chat, items[0], max_new_tokens=8)
    engine.submit(short)
    while not engine.running:
        engine.step()
    engine.submit(long_)
    engine.step()
    assert long_ in engine.prefilling and short.completion_tokens >= 2  # decoding went on beside the chunk
    while not (short.done.is_set() and long_.done.is_set()):
        engine.step()
    assert [short.text.strip(), long_.text.strip()] == alone


def test_a_request_that_cannot_fit_the_cache_fails_alone_with_a_message(chat):
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=2, max_context=40))
    item = conversations()[0]
    fits, too_long = _seq(chat, item, max_new_tokens=4), _seq(chat, item, max_new_tokens=39)
    engine.run_until_done([fits, too_long])
    assert fits.finish_reason == "length" and too_long.finish_reason == "error"
    assert isinstance(too_long.error, CapacityError) and "40 tokens" in str(too_long.error)
    assert engine.kv.used == 0


def test_out_of_memory_in_a_step_fails_those_requests_and_the_engine_goes_on(chat, monkeypatch):
    items = conversations()
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=4))
    try:
        real = engine.decode_forward
        calls = {"n": 0}

        def once_out_of_memory(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "decode_forward", once_out_of_memory)
        first = [engine.submit(_seq(chat, it, max_new_tokens=6)) for it in items[:2]]
        engine.start()  # both admitted together: the second decode step holds both
        assert all(s.done.wait(60) for s in first)
        assert {s.finish_reason for s in first} == {"error"}
        assert all(isinstance(s.error, torch.OutOfMemoryError) for s in first)
        later = engine.submit(_seq(chat, items[2], max_new_tokens=6))
        assert later.done.wait(60) and later.finish_reason in ("stop", "length")
        assert engine._thread.is_alive()
    finally:
        engine.stop()
    assert engine.kv.used == 0  # every slot back (checked once the engine thread has finished its step)


def test_bucketed_decode_pads_rows_and_columns_without_changing_answers(chat):
    """The CUDA-graph path's shapes (rows and columns rounded up to powers of two, idle rows writing
    the trash column) on the CPU: capture is impossible here, so each bucket runs eagerly."""
    items = conversations()
    alone = [chat.generate([it], max_new_tokens=7)[0] for it in items[:3]]
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=4, cuda_graphs=True))
    assert engine.graphs is not None
    seqs = engine.run_until_done([_seq(chat, it, max_new_tokens=7) for it in items[:3]])
    assert [s.text.strip() for s in seqs] == alone
    assert engine.graphs.failed and all(n in (1, 2, 4) and w >= 256 for n, w in engine.graphs.failed)


def test_requests_admitted_together_share_one_encoder_call_per_kind(chat, encoder_calls):
    items = conversations()  # three with images (one with two), one with audio
    engine = GenerationEngine(chat, EngineConfig(max_batch_size=8))
    engine.run_until_done([_seq(chat, it, max_new_tokens=2) for it in items])
    assert encoder_calls == {"image": 1, "video": 0, "audio": 1}
