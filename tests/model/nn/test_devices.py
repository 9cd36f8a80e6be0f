"""Every input reaches each module on that module's device, with the LLM and the encoders on
different devices than the CPU the prompts are collated on.

CI has no GPU, so the second device is `meta`: the LLM's decoder layers and LM head, and the vision
tower, live there (shapes only, no values). The LM head's output and the vision projector's are
replaced by real CPU tensors (what a GPU would hand back), so the engine still samples, streams and
finishes; a forward pre-hook on every module records any input that is not on its device. A single
`.to(device)` missing anywhere in prefill, decode or the encoders' inputs fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model.config import EngineConfig
from model.nn.engine import GenerationEngine, Sequence
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.nn.sampling import SamplingParams
from model.text.processor import ChatInput, OmniProcessor

META = torch.device("meta")
ANSWER = 7  # the token the fake LM head always prefers (an ordinary one, not a stop token)


def _own_device(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return t.device
    return None


def _audit(model: nn.Module) -> list[str]:
    """Pre-hooks on every module that owns tensors: each tensor input must be on the module's device."""
    wrong: list[str] = []

    def check(name: str, device: torch.device):
        def hook(_module, args, kwargs):
            for key, value in [*enumerate(args), *kwargs.items()]:
                if isinstance(value, torch.Tensor) and value.device != device:
                    wrong.append(f"{name}: input {key} on {value.device}, module on {device}")
        return hook

    for name, module in model.named_modules():
        if (device := _own_device(module)) is not None:
            module.register_forward_pre_hook(check(name, device), with_kwargs=True)
    return wrong


@pytest.fixture()
def split_chat(tiny_cfg, tokenizer) -> OmniChat:
    """The LLM's layers and head and the vision tower on `meta`; token embeddings and audio on the CPU."""
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).eval()
    model.llm.model.layers.to(META)
    model.llm.model.norm.to(META)
    model.llm.model.rotary_emb.to(META)
    model.llm.lm_head = nn.Linear(tiny_cfg.llm.hidden_size, len(tokenizer), bias=False, device=META)
    model.vision_tower.to(META)
    model.vision_projector.to(META)

    def real_logits(_module, _args, out):  # the LM head's result, as a GPU would copy it back
        logits = torch.zeros(out.shape)
        logits[..., ANSWER] = 1.0
        return logits

    def real_image_tokens(_module, _args, out):
        return torch.zeros(out.shape)

    model.llm.lm_head.register_forward_hook(real_logits)
    model.vision_projector.register_forward_hook(real_image_tokens)
    return OmniChat(model, processor)


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))


def test_engine_hands_every_module_its_inputs_on_its_device(split_chat):
    wrong = _audit(split_chat.model)
    items = [ChatInput([{"role": "user", "content": "<image>describe"}], images=[_image()]),
             ChatInput([{"role": "user", "content": "<audio>transcribe"}],
                       audios=[np.zeros(16000, dtype=np.float32)]),
             ChatInput([{"role": "user", "content": "what color is the shape"}])]
    seqs = [Sequence(split_chat.processor.encode(it, add_generation_prompt=True), SamplingParams(max_new_tokens=4))
            for it in items]
    engine = GenerationEngine(split_chat, EngineConfig(max_batch_size=2))  # one request waits for a slot
    engine.run_until_done(seqs)
    assert not wrong, wrong[:5]
    assert [s.finish_reason for s in seqs] == ["length"] * 3, [s.error for s in seqs]
    assert ANSWER not in split_chat.stop_ids
    assert [s.stream.ids for s in seqs] == [[ANSWER] * 4] * 3
    # Asked again: the prefix cache's paths (a slot's columns copied or taken over, the text-only rest
    # embedded without the encoders) hand every module its inputs on its device too.
    again = [Sequence(split_chat.processor.encode(it, add_generation_prompt=True), SamplingParams(max_new_tokens=4))
             for it in items]
    engine.run_until_done(again)
    assert not wrong, wrong[:5]
    assert any(s.cached_tokens == s.prompt_tokens - 1 for s in again)  # two slots: three prompts cannot all stay
    assert [s.stream.ids for s in again] == [[ANSWER] * 4] * 3



def test_generate_prompt_inputs_land_on_their_modules_devices(split_chat):
    """The same split for `OmniChat`'s prompt embedding: what `generate`, and so the evaluation
    runner and the Triton entry model, hand the LLM."""
    wrong = _audit(split_chat.model)
    items = [ChatInput([{"role": "user", "content": "<image>describe"}], images=[_image()]),
             ChatInput([{"role": "user", "content": "<audio>transcribe"}], audios=[np.zeros(16000, dtype=np.float32)])]
    inputs = split_chat._inputs(items)
    assert not wrong, wrong[:5]
    assert inputs["inputs_embeds"].shape[0] == 2 and inputs["inputs_embeds"].device == torch.device("cpu")
