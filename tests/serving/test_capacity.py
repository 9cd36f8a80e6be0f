"""A request the engine cannot hold (beyond a sequence's KV cache, or the accelerator out of memory in
its step) is answered 503 with the reason, as a deadline is, never a 500."""

from __future__ import annotations

import pytest
import torch

from model.nn.engine import CapacityError, Sequence
from model.nn.sampling import SamplingParams
from model.text.processor import Encoded

# serving.predictor is imported in the test: it imports kserve, whose protobuf definitions clash with
# tritonclient.grpc's, which other test modules load in this process at collection.


@pytest.mark.parametrize("error, needle", [
    (CapacityError("the prompt is 900 tokens; with max_tokens=200 it exceeds the 1024 tokens"), "1024 tokens"),
    (torch.OutOfMemoryError("CUDA out of memory"), "ran out of accelerator memory"),
])
def test_capacity_and_memory_failures_are_503_with_the_reason(error, needle):
    """Both routes answer DeadlineExceeded (and so OutOfCapacity) with 503, Retry-After and the message."""
    from serving.predictor import DeadlineExceeded, OutOfCapacity, _raise_failures

    seq = Sequence(Encoded([1], [1]), SamplingParams())
    seq.finish_reason, seq.error = "error", error
    with pytest.raises(OutOfCapacity, match=needle) as raised:
        _raise_failures([seq])
    assert isinstance(raised.value, DeadlineExceeded)


BATCHING = ["serving.batching.max_batch_size=3", "serving.batching.max_context=100", "serving.batching.prefill_chunk=7",
            "serving.batching.cuda_graphs=false", "serving.limits.max_tokens=16", "serving.max_new_tokens=8"]


def test_the_serving_config_reaches_the_engine(checkpoint):
    """`serving.batching` overrides of the config tree (as `omni serve` takes them) become the engine's
    settings, and a prompt beyond the configured columns is a 400 naming them, before it is queued."""
    from components.config import load_config
    from serving.conversation import BadRequest, Conversation
    from serving.predictor import OmniPredictor

    cfg = load_config(BATCHING).serving
    predictor = OmniPredictor("omni", checkpoint, cfg)
    predictor.load()
    try:
        engine = predictor.engine
        assert engine.config == cfg.batching and engine.config.prefill_chunk == 7
        assert (engine.kv.slots, engine.kv.capacity, engine.graphs) == (3, 100, None)
        long_prompt = Conversation([{"role": "user", "content": "what color is the shape " * 30}])
        with pytest.raises(BadRequest, match="exceeds the 100 tokens this server keeps per sequence"):
            predictor._prepare_sync([long_prompt], 8)
    finally:
        predictor.stop()


def test_a_context_beyond_the_model_window_fails_the_load_naming_the_setting(checkpoint):
    from components.config import load_config
    from serving.predictor import OmniPredictor

    cfg = load_config(["serving.batching.max_context=5000"]).serving  # the tiny model's window is 1024
    with pytest.raises(ValueError, match=r"serving\.batching: max_context=5000 exceeds the model's context window"):
        OmniPredictor("omni", checkpoint, cfg).load()
