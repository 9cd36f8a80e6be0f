"""The encoder registry of OmniModel: one entry per input kind, every kind run the same way (once
per micro-batch, in registry order, on every data-parallel rank), frozen towers without a graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model.config import MODULES
from model.data.packing import MEDIA_KEYS
from model.nn.encoders import ENCODERS, Encoder, media_inputs
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor


@pytest.fixture()
def parts(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    return OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids), processor


def _batch(processor: OmniProcessor, content: str, **media) -> dict:
    return processor.collate([processor.encode(ChatInput(
        messages=[{"role": "user", "content": content}, {"role": "assistant", "content": "red"}], **media))])


def _image_and_audio(processor: OmniProcessor) -> dict:
    audio = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    return _batch(processor, "<image><audio>what color?", images=[Image.new("RGB", (50, 40), "red")], audios=[audio])


def test_registry_builds_the_checkpoint_modules_in_order(parts):
    model, _ = parts
    built = [name for e in ENCODERS.values() for name in e.builds] + ["llm"]
    assert tuple(built) == MODULES == tuple(name for name, _ in model.named_children())
    assert media_inputs() == set(MEDIA_KEYS)  # what the packing collator carries over


class DepthModel(OmniModel):
    """A fourth input kind added as one entry: its tower and projector, keys and placeholder."""

    ENCODERS = {**ENCODERS, "depth": Encoder(
        inputs=("depth_values",), tower="depth_tower", projectors=("depth_projector",),
        run_tower=lambda model, x: model.depth_tower(x), project=lambda model, h, _x: model.depth_projector(h),
        dummy=lambda cfg, device: (torch.zeros(1, 1, 3, device=device),), checkpointed="vision_tower",
        builds={"depth_tower": lambda cfg, hf: nn.Linear(3, 8),
                "depth_projector": lambda cfg, hf: nn.Linear(8, cfg.llm.hidden_size)})}


def test_a_new_kind_is_one_entry(parts, tiny_cfg, tokenizer):
    model, processor = parts
    depth_id = 11  # any id that is not another kind's placeholder
    assert depth_id not in processor.placeholder_ids.values()
    torch.manual_seed(0)
    depth = DepthModel(tiny_cfg, len(tokenizer), {**processor.placeholder_ids, "depth": depth_id}).eval()
    assert list(model.state_dict()) == [k for k in depth.state_dict() if not k.startswith("depth_")]
    ids = torch.tensor([[1, depth_id, 2, depth_id]])
    values = torch.randn(1, 2, 3)
    with torch.no_grad():
        embeds = depth.embed(ids, depth_values=values)
        torch.testing.assert_close(embeds[0, [1, 3]], depth.depth_projector(depth.depth_tower(values))[0])
        assert torch.isfinite(depth(ids, depth_values=values, labels=ids).loss)
    with pytest.raises(ValueError, match="no placeholder token id for \\['depth'\\]"):
        DepthModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)


def test_bad_media_inputs_are_named(parts):
    model, processor = parts
    batch = _image_and_audio(processor)
    with pytest.raises(TypeError, match="unknown media inputs \\['audio_wave'\\]"):
        model.embed(batch["input_ids"], audio_wave=batch["audio_mel"])
    with pytest.raises(ValueError, match="audio input \\['audio_frames'\\] missing"):
        model.embed(batch["input_ids"], pixel_values=batch["pixel_values"], audio_mel=batch["audio_mel"])


def _tower_calls(model: OmniModel) -> list[tuple[str, int]]:
    """(tower, items) per call, appended as the towers run."""
    calls = []
    for name in dict.fromkeys(e.tower for e in ENCODERS.values()):
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: calls.append((name, (args or [*kwargs.values()])[0].shape[0])),
            with_kwargs=True)
    return calls


def test_data_parallel_ranks_run_every_kind_once_in_registry_order(parts, monkeypatch):
    """What ZeRO-3 needs from every rank, whatever media it holds (the 2-rank DeepSpeed check is
    tests/model/training/test_mixed_modalities.py): the same tower calls, in the same order."""
    model, processor = parts
    model.train()
    batch = _batch(processor, "<video>what color?", videos=[[Image.new("RGB", (64, 64), "blue")] * 3])
    alone = model(**batch).loss
    calls = _tower_calls(model)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torch.equal(model(**batch).loss, alone)  # the dummy passes add exactly zero
    # the image dummy, the 3 frames, the audio dummy
    assert calls == [("vision_tower", 1), ("vision_tower", 3), ("audio_encoder", 1)]
    calls.clear()
    model(**_image_and_audio(processor))
    assert [c[0] for c in calls] == ["vision_tower", "vision_tower", "audio_encoder"]


def test_frozen_tower_runs_without_a_graph_and_its_projector_still_learns(parts):
    model, processor = parts
    model.train()
    batch = _image_and_audio(processor)
    graphs = {}  # tower -> whether it ran recording a graph

    def record(name: str):
        def hook(module, args, out) -> None:
            graphs[name] = torch.is_grad_enabled()
        return hook

    for name in ("vision_tower", "audio_encoder"):
        model.get_submodule(name).register_forward_hook(record(name))

    def projector_grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "projector" in n and p.grad is not None}

    trained = projector_grads()
    assert graphs == {"vision_tower": True, "audio_encoder": True}
    model.vision_tower.requires_grad_(False)
    model.audio_encoder.requires_grad_(False)
    graphs.clear()
    frozen = projector_grads()
    assert graphs == {"vision_tower": False, "audio_encoder": False}
    assert trained.keys() == frozen.keys() and trained  # the projectors learn exactly as before
    for name in trained:
        torch.testing.assert_close(frozen[name], trained[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_frozen_tower_and_projector_give_features_without_grad_fn(parts):
    model, processor = parts
    model.train()
    pixels = _image_and_audio(processor)["pixel_values"]
    assert model.encode("image", pixels).grad_fn is not None
    model.vision_tower.requires_grad_(False)
    assert model.encode("image", pixels).grad_fn is not None  # the projector still trains
    model.vision_projector.requires_grad_(False)
    assert model.encode("image", pixels).grad_fn is None


def test_one_process_under_zero3_runs_every_kind_too(parts):
    """ZeRO-3 marks its partitioned parameters with `ds_id`; a module skipped in some micro-batches
    of an accumulated step would train on stale weights there, so one process keeps the rule too."""
    model, processor = parts
    model.train()
    calls = _tower_calls(model)
    model(**_batch(processor, "say red"))
    assert calls == []
    model.llm.get_input_embeddings().weight.ds_id = 0
    model(**_batch(processor, "say red"))
    assert calls == [("vision_tower", 1), ("vision_tower", 1), ("audio_encoder", 1)]
