from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from model.config import MODULES, StageConfig
from model.inference import OmniChat
from model.modeling import OmniModel
from model.processor import ChatInput, OmniProcessor
from model.train import set_trainable, train_stage

STAGE_FILES = sorted((Path(__file__).resolve().parents[2] / "conf" / "stage").glob("*.yaml"))
COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def _omni_sample(color="red"):
    return ChatInput(
        messages=[{"role": "user", "content": "<image><video><audio>what color?"}, {"role": "assistant", "content": color}],
        images=[Image.new("RGB", (64, 64), COLORS[color])], videos=[[Image.new("RGB", (64, 64), COLORS[color])] * 2],
        audios=[np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)],
    )


@pytest.mark.parametrize("stage_file", STAGE_FILES, ids=lambda p: p.stem)
def test_gradients_reach_exactly_the_trainable_modules(stage_file, tiny_cfg, tokenizer):
    stage = StageConfig(**OmegaConf.to_container(OmegaConf.load(stage_file)))
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    set_trainable(model, stage.trainable)
    model(**processor.collate([processor.encode(_omni_sample())])).loss.backward()
    for name in MODULES:
        grads = [p.grad for p in getattr(model, name).parameters()]
        if name in stage.trainable:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{stage.name}: no gradient in {name}"
        else:
            assert all(g is None for g in grads), f"{stage.name}: frozen {name} got a gradient"


def test_activation_checkpointing_saves_less_and_keeps_gradients(tiny_cfg, tokenizer):
    processor = OmniProcessor(tokenizer, tiny_cfg)
    batch = processor.collate([processor.encode(_omni_sample())])
    grads, saved = [], []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).train()
        model.set_activation_checkpointing(enabled)
        kept = [0]  # bytes autograd keeps from the forward for the backward

        def pack(t, kept=kept):
            kept[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        saved.append(kept[0])
    assert saved[1] < saved[0] / 2, f"checkpointing kept {saved[1]} bytes of activations vs {saved[0]} without"
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_deepspeed_stage_learns_and_generation_agrees(zero_stage, tiny_cfg, tokenizer):
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    frozen_before = model.audio_encoder.encoder.conv1.weight.clone()
    samples = [processor.encode(ChatInput(
        messages=[{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": c}],
        images=[Image.new("RGB", (64, 64), rgb)])) for c, rgb in COLORS.items()] * 4
    stage = StageConfig(name="t", trainable=["vision_projector", "llm"], lr=3e-3, data_tasks=["x"], steps=40,
                        micro_batch_size=8, zero_stage=zero_stage, warmup_steps=2)
    result = train_stage(model, processor, samples, stage, progress=False)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert torch.equal(model.audio_encoder.encoder.conv1.weight, frozen_before)
    chat = OmniChat(model, processor)
    questions = [ChatInput(messages=[{"role": "user", "content": "<image>what color?"}],
                           images=[Image.new("RGB", (64, 64), rgb)]) for rgb in COLORS.values()]
    batched = chat.generate(questions, max_new_tokens=6)
    assert batched == [chat.generate([q], max_new_tokens=6)[0] for q in questions]
    assert batched == list(COLORS)
    assert "".join(chat.stream(questions[0], max_new_tokens=6)) == batched[0]
