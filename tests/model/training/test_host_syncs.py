"""The training loop does not wait for the device between reports: every way a tensor's value reaches
Python (.item(), .tolist(), .cpu(), .numpy(), bool/int/float of a tensor) is counted over a whole
stage, by the module that asks (the loader's own work on host tensors aside). The loop's own reads
stay at one per report, however many micro-batches and steps lie between; on a GPU each read would
drain the queue of kernels. (The model's forward, transformers' mask helper and DeepSpeed's clipping
read as well: they show in the failure message, by file and line.)"""

from __future__ import annotations

import collections
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

from model.config import StageConfig
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor
from model.training import recipe

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class _Reads:
    """Counts tensor-to-Python reads while `active`, with where each came from."""

    def __init__(self, monkeypatch):
        self.active, self.calls = False, collections.Counter()
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.active:
                frame = traceback.extract_stack(limit=2)[0]  # the caller of the read
                self.calls[f"{name} at {frame.filename}:{frame.lineno}"] += 1
            return original(tensor, *args, **kwargs)

        return read


def _paused_while_loading(batches, reads: _Reads):
    """The batches, with counting off while the loader makes each (host tensors: no device involved)."""
    while True:
        reads.active = False
        batch = next(batches, None)
        reads.active = True
        if batch is None:
            return
        yield batch


def _setup(tiny_cfg, tokenizer) -> tuple[OmniModel, OmniProcessor, list, StageConfig]:
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    colors = enumerate(["red", "blue"] * 3)
    samples = [processor.encode(ChatInput(
        messages=[{"role": "user", "content": "<image>what color?" if i % 2 else "say a color"},
                  {"role": "assistant", "content": c}],
        images=[Image.new("RGB", (32, 32), (40 * i, 0, 0))] if i % 2 else [])) for i, c in colors]
    stage = StageConfig(name="s", trainable=["vision_projector", "llm"], lr=1e-3, data_tasks=["x"], steps=6,
                        micro_batch_size=2, grad_accum=2, grad_clip=1.0)
    return model, processor, samples, stage


def test_the_loop_reads_once_per_report_not_per_step(tiny_cfg, tokenizer, monkeypatch):
    model, processor, samples, stage = _setup(tiny_cfg, tokenizer)
    reads = _Reads(monkeypatch)
    batches = recipe.StageData.batches
    monkeypatch.setattr(recipe.StageData, "batches",
                        lambda self, *a: _paused_while_loading(iter(batches(self, *a)), reads))
    loop = recipe._loop

    def counted_loop(*args):
        try:
            loop(*args)
        finally:
            reads.active = False

    monkeypatch.setattr(recipe, "_loop", counted_loop)
    result = recipe.train_stage(model, processor, samples, stage, progress=False, report_every=3)
    assert len(result.losses) == 6 and result.tokens > 0 and all(loss > 0 for loss in result.losses)
    training = str(Path(recipe.__file__).parent)
    ours = sum(n for where, n in reads.calls.items() if training in where)
    assert sum(reads.calls.values()) > ours, "nothing else read: is the counting on?"
    assert ours <= 2, f"2 reports over 6 steps x 2 micro-batches, but the loop read {ours}: {dict(reads.calls)}"


def test_the_wait_for_data_is_measured(tiny_cfg, tokenizer, monkeypatch):
    """A loader that takes 50 ms per micro-batch shows as host time waiting for data (the figure the
    GPU benchmark reports as data_wait_fraction): 6 steps x 2 micro-batches, at least 0.6 s."""
    model, processor, samples, stage = _setup(tiny_cfg, tokenizer)
    batches = recipe.StageData.batches

    def slow(self, *args):
        for batch in batches(self, *args):
            time.sleep(0.05)
            yield batch

    monkeypatch.setattr(recipe.StageData, "batches", slow)
    result = recipe.train_stage(model, processor, samples, stage, progress=False)
    assert 0.6 <= result.data_wait_seconds < result.seconds
