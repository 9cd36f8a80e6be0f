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
