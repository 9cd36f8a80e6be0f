from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from model.config import MODULES, StageConfig
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor
from model.training.optim import deepspeed_config, param_groups, set_trainable, warmup_cosine
from model.training.recipe import train_stage

STAGE_FILES = sorted((Path(__file__).resolve().parents[3] / "conf" / "stage").glob("*.yaml"))
COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def _omni_sample(color="red"):
    return ChatInput(
        messages=[
            {"role": "user", "content": "<image><video><audio>what color?"},
            {"role": "assistant", "content": color},
        ],
        images=[Image.new("RGB", (64, 64), COLORS[color])],
        videos=[[Image.new("RGB", (64, 64), COLORS[color])] * 2],
        audios=[np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)],
    )


@pytest.mark.parametrize("stage_file", STAGE_FILES, ids=lambda p: p.stem)
def test_gradients_reach_exactly_the_trainable_modules(stage_file, tiny_cfg, tokenizer):
    stage = StageConfig(**OmegaConf.to_container(OmegaConf.load(stage_file)))
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    set_trainable(model, stage.trainable)
    assert "audio_encoder.encoder.embed_positions.weight" in model.fixed_parameters  # Whisper's sinusoids
    model(**processor.collate([processor.encode(_omni_sample())])).loss.backward()
    for name in MODULES:
        params = dict(getattr(model, name).named_parameters(prefix=name))
        if name in stage.trainable:
            # Every parameter of a trainable module learns, except those its tower keeps fixed.
            missed = [n for n, p in params.items() if n not in model.fixed_parameters and p.grad is None]
            assert not missed, f"{stage.name}: no gradient reached {missed[:3]}"
            assert any(p.grad.abs().sum() > 0 for n, p in params.items() if p.grad is not None)
        assert all(
            params[n].grad is None for n in params if name not in stage.trainable or n in model.fixed_parameters
        ), f"{stage.name}: a frozen parameter of {name} got a gradient"


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
    samples = [
        processor.encode(
            ChatInput(
                messages=[{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": c}],
                images=[Image.new("RGB", (64, 64), rgb)],
            )
        )
        for c, rgb in COLORS.items()
    ] * 4
    stage = StageConfig(
        name="t",
        trainable=["vision_projector", "llm"],
        lr=3e-3,
        data_tasks=["x"],
        steps=40,
        micro_batch_size=8,
        zero_stage=zero_stage,
        warmup_steps=2,
    )
    result = train_stage(model, processor, samples, stage, progress=False)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert torch.equal(model.audio_encoder.encoder.conv1.weight, frozen_before)
    chat = OmniChat(model, processor)
    questions = [
        ChatInput(
            messages=[{"role": "user", "content": "<image>what color?"}], images=[Image.new("RGB", (64, 64), rgb)]
        )
        for rgb in COLORS.values()
    ]
    batched = chat.generate(questions, max_new_tokens=6)
    assert batched == [chat.generate([q], max_new_tokens=6)[0] for q in questions]
    assert batched == list(COLORS)
    assert "".join(chat.stream(questions[0], max_new_tokens=6)) == batched[0]


def test_param_groups_give_the_vit_its_own_rate_and_skip_frozen_modules(tiny_cfg, tokenizer):
    stage = StageConfig(**OmegaConf.to_container(OmegaConf.load(STAGE_FILES[0].with_name("image_3.yaml"))))
    assert stage.lr_overrides["vision_tower"] < stage.lr  # the paper-recipe file sets a slower ViT
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids)
    set_trainable(model, stage.trainable)
    groups = {g["name"]: g for g in param_groups(model, stage)}
    assert set(groups) == set(stage.trainable)
    assert groups["vision_tower"]["lr"] == stage.lr_overrides["vision_tower"]
    assert groups["vision_projector"]["lr"] == groups["llm"]["lr"] == stage.lr
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_warmup_then_cosine_to_zero():
    stage = StageConfig(name="s", trainable=["llm"], lr=1.0, data_tasks=["t"], steps=110, warmup_steps=10)
    f = warmup_cosine(stage)
    assert [f(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # halfway through the cosine
    assert f(109) < 0.001 and f(500) == 0.0
    assert all(f(i) >= f(i + 1) for i in range(10, 120))


def test_deepspeed_config_carries_clipping_accumulation_and_zero_stage():
    stage = StageConfig(
        name="s",
        trainable=["llm"],
        lr=1.0,
        data_tasks=["t"],
        steps=1,
        grad_clip=0.5,
        grad_accum=4,
        micro_batch_size=2,
        zero_stage=3,
    )
    ds = deepspeed_config(stage)
    assert ds["gradient_clipping"] == 0.5 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 3
