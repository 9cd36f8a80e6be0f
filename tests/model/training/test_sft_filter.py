"""Loss-based SFT filter: the Gaussian rule, per-task fits, and per-sample losses that do not depend
on what else is in the batch."""

import numpy as np
import torch
from PIL import Image

from model.config import SftFilterConfig
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor
from model.training.sft_filter import loss_filter, sample_losses


def _losses(n, mean, std, seed):
    return list(np.random.default_rng(seed).normal(mean, std, n))


def test_outliers_on_both_sides_are_dropped_and_named():
    losses = _losses(50, 2.0, 0.1, 0) + [0.01, 9.0]
    ids = [f"r{i}" for i in range(len(losses))]
    result = loss_filter(ids, ["qa"] * len(losses), losses, SftFilterConfig(k_sigma=2.0))
    sides = {d["id"]: d["side"] for d in result.dropped}
    assert sides["r50"] == "low" and sides["r51"] == "high"
    assert result.kept + len(result.dropped) == len(losses)
    fit = result.fits["qa"]
    assert fit.dropped_low >= 1 and fit.dropped_high >= 1 and fit.low < 2.0 < fit.high


def test_per_task_fit_keeps_a_hard_task_that_one_global_fit_would_drop():
    easy, hard = _losses(40, 0.5, 0.05, 1), _losses(40, 4.0, 0.05, 2)
    losses, tasks = easy + hard, ["mcq"] * 40 + ["asr"] * 40
    ids = [str(i) for i in range(80)]
    per_task = loss_filter(ids, tasks, losses, SftFilterConfig(k_sigma=3.0))
    assert per_task.dropped == []
    one_fit = loss_filter(ids, tasks, losses, SftFilterConfig(k_sigma=0.9, group_by="all"))
    assert len(one_fit.dropped) == 80  # every sample is ~1 std from the bimodal mean


def test_small_groups_are_kept_whole():
    result = loss_filter(["a", "b", "c"], ["x"] * 3, [0.0, 1.0, 100.0], SftFilterConfig(min_group_size=8))
    assert result.dropped == [] and result.kept == 3


def test_per_sample_loss_is_the_models_loss_and_ignores_batch_padding(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    samples = [
        processor.encode(ChatInput(messages=[{"role": "user", "content": "<image>what color?"},
                                             {"role": "assistant", "content": "red"}],
                                   images=[Image.new("RGB", (64, 64), "red")])),
        processor.encode(ChatInput(messages=[{"role": "user", "content": "describe the shape in the audio please"},
                                             {"role": "assistant", "content": "a blue shape, two"}])),
    ]
    batched = sample_losses(model, processor, samples, batch_size=2)
    alone = [sample_losses(model, processor, [s], batch_size=1)[0] for s in samples]
    np.testing.assert_allclose(batched, alone, rtol=1e-4)
    # A lazy stream (how the pipeline step feeds it) scores the same, in batches of any size.
    streamed = sample_losses(model, processor, (s for s in samples * 2), batch_size=3)
    np.testing.assert_allclose(streamed, batched * 2, rtol=1e-4)
    with torch.no_grad():
        reference = model(**processor.collate([samples[0]])).loss.item()
    assert abs(alone[0] - reference) < 1e-4
