"""Where each model input is consumed, so every tensor lands on the device of the module that reads it.

The LLM, the vision tower and the audio encoder may live on different devices (the Triton entry
model runs the encoders outside torch, on the host; a large model may put its towers on another
GPU), so "the model's device" is not one thing: token ids and masks go to the LLM's embedding
table, pixels to the vision tower, log-mel windows to the audio encoder. A model that knows better
(an encoder outside torch) says so with its own `input_devices()`.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

LLM_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def module_device(module: nn.Module | None, default: torch.device | None = None) -> torch.device | None:
    """The device of a module's first parameter (or buffer); `default` when it has neither."""
    first = None if module is None else next(itertools.chain(module.parameters(), module.buffers()), None)
    return default if first is None else first.device


def llm_device(model) -> torch.device:
    """Where the LLM reads its token ids: its input embedding table."""
    return module_device(model.llm.get_input_embeddings(), torch.device("cpu"))


def input_devices(model) -> dict[str, torch.device]:
    """Each collated input's consumer device (`OmniProcessor.collate`'s keys)."""
    own = getattr(model, "input_devices", None)
    if callable(own):
        return own()
    llm = llm_device(model)
    devices = dict.fromkeys(LLM_INPUTS, llm)
    for encoder in getattr(model, "ENCODERS", {}).values():  # each kind's media go to its tower
        tower = module_device(model.get_submodule(encoder.tower), llm)
        devices |= dict.fromkeys(encoder.inputs, tower)
    return devices


def to_consumers(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (a collated batch) each moved to the device that consumes it (unknown keys: the LLM's)."""
    devices = input_devices(model)
    llm = devices["input_ids"]
    return {k: v.to(devices.get(k, llm)) for k, v in tensors.items()}
