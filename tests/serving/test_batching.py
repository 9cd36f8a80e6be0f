"""Concurrent requests through the predictor share the engine's work: requests that are waiting together
are encoded in one call per kind and decoded in the same steps; the engine thread's answers reach the
event loop in one wake-up per burst. Structure only, never timing (benchmarks/bench_serving.py
measures the speed)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from model.nn.sampling import SamplingParams
from serving.conversation import Conversation, GenerateRequest, MediaItem

# serving.predictor is imported in the tests: it imports kserve, whose protobuf definitions clash with
# tritonclient.grpc's, which other test modules load in this process at collection.

CLIENTS = 8


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _image_question(stop_ids: list[int]) -> GenerateRequest:
    conv = Conversation([{"role": "user", "content": "<image>describe the picture"}],
                        [MediaItem("image", _png(1), "messages[0].content[0]")])
    no_end = {i: -100.0 for i in stop_ids}  # every answer runs to max_new_tokens: all finish in one step
    return GenerateRequest([conv], SamplingParams(max_new_tokens=6, logit_bias=no_end))


def test_concurrent_image_questions_share_one_encoder_call_and_every_decode_step(checkpoint, monkeypatch):
    from serving.predictor import OmniPredictor

    predictor = OmniPredictor("omni", checkpoint)
    predictor.load()
    engine = predictor.engine
    engine.stop()  # the test steps the engine itself, once all the requests wait (as 8 clients at once do)
    encoded, batches = [], []
    encode = engine.model.encode

    def counted(kind, *inputs):
        encoded.append((kind, len(inputs[0])))
        return encode(kind, *inputs)

    monkeypatch.setattr(engine.model, "encode", counted)
    monkeypatch.setattr(engine.observer, "on_step", lambda batch_size, waiting: batches.append(batch_size))

    def drive() -> None:
        seqs = list(engine.waiting)
        while not all(s.done.is_set() for s in seqs):
            engine.step()

    async def clients():
        requests = [asyncio.ensure_future(predictor(_image_question(predictor.chat.stop_ids)))
                    for _ in range(CLIENTS)]
        while engine.queue_depth < CLIENTS:  # preprocessed in worker threads, then queued
            assert not any(r.done() for r in requests), [r.exception() for r in requests if r.done()]
            await asyncio.sleep(0.01)
        await asyncio.to_thread(drive)
        return [(await r)[0] for r in requests]

    try:
        answers = asyncio.run(asyncio.wait_for(clients(), 120))
    finally:
        predictor.stop()
    assert encoded == [("image", CLIENTS)]  # the 8 images in one vision call
    # All 8 decoded in the same steps (a prefill chunk may finish some prompts a step before the others),
    # and no token decoded twice: each answer's first token comes from its prefill, the other 5 from steps.
    assert CLIENTS in batches and sum(batches) == CLIENTS * (6 - 1)
    assert len({a[0].text for a in answers}) == 1 and all(a[0].completion_tokens == 6 for a in answers)


def test_the_loop_is_woken_once_for_a_burst_of_calls_from_the_engine_thread():
    from serving.predictor import LoopWaker

    loop = asyncio.new_event_loop()
    wakes, seen = [], []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda fn, *a: (wakes.append(fn), real(fn, *a))[1]
    try:
        waker = LoopWaker(loop)
        for i in range(CLIENTS):  # one step finishing 8 sequences, before the loop runs
            waker.call(seen.append, i)
        loop.run_until_complete(asyncio.sleep(0))
        waker.call(seen.append, CLIENTS)  # the next burst wakes it again
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert seen == list(range(CLIENTS + 1)) and len(wakes) == 2


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
