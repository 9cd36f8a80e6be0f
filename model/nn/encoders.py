"""The omni model's input kinds, one entry each (`ENCODERS`): the batch keys that carry the kind, the
modules it adds to `OmniModel`, how its tower and projectors turn those inputs into LLM-width
tokens, and the smallest input that runs them. Each kind's name is also the key of its placeholder
token in `OmniModel.media_token_ids`, the token its tokens replace in the LLM's input.

    image  pixel_values (tiles, 3, H, W)        -> vision_tower -> vision_projector -> (tiles, tokens, dim)
    video  video_pixel_values (frames, 3, H, W) -> vision_tower -> video_projector  -> (frames, tokens, dim)
    audio  audio_mel (windows, bins, T), audio_frames -> audio_encoder -> audio_projector -> (tokens, dim) per window

Adding a kind is one entry here (plus its placeholder token in the processor). Module names are the
checkpoint's parameter prefixes and keep their build order, so a kind's entry never renames a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig, SiglipVisionModel

from model.config import ModelConfig
from model.nn.audio import AudioEncoder
from model.nn.projectors import ConvGMLPProjector, VideoProjector, VisionProjector

# The entries' functions take the OmniModel as `model` (typed nn.Module: this module sits below it).
# (our config, Hugging Face configs by part: "vision", "audio", "llm") -> a fresh module
Builder = Callable[[ModelConfig, dict[str, PretrainedConfig]], nn.Module]
Features = torch.Tensor | list[torch.Tensor]  # (items, tokens, dim), or one (tokens, dim) per item


@dataclass(frozen=True)
class Encoder:
    """One input kind. `run_tower(model, *inputs)` -> the tower's output; `project(model, hidden,
    *inputs)` -> Features. The tower reads only media, so when its weights are frozen nothing
    upstream of it trains and its graph is never needed (`OmniModel.encode` runs it under no_grad)."""

    inputs: tuple[str, ...]  # batch keys, as the collator names them; given all together or not at all
    tower: str  # the module that reads the media
    projectors: tuple[str, ...]  # the modules after the tower, into the LLM's width
    run_tower: Callable[..., torch.Tensor]
    project: Callable[..., Features]
    dummy: Callable[[ModelConfig, torch.device], tuple[torch.Tensor, ...]]  # the cheapest valid inputs
    checkpointed: str  # the Hugging Face model inside the tower whose layers activation checkpointing wraps
    builds: dict[str, Builder] = field(default_factory=dict)  # modules this kind adds (shared ones: the first kind's)


def tokens(features: Features) -> torch.Tensor:
    """A kind's features as the flat (tokens, dim) sequence its placeholders take, in item order."""
    return features.flatten(0, 1) if isinstance(features, torch.Tensor) else torch.cat(features)


def _siglip_patches(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model.vision_tower(pixel_values=pixels).last_hidden_state


def _one_tile(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor]:
    v = cfg.vision
    return (torch.zeros(1, v.num_channels, v.image_size, v.image_size, device=device),)


def _audio_window_tokens(model: nn.Module, hidden: torch.Tensor, mel: torch.Tensor,
                         frames: torch.Tensor) -> list[torch.Tensor]:
    """Padded windows' encoder output -> one (tokens, llm_dim) tensor per window, its padding cut."""
    projected = model.audio_projector(hidden)
    per_window = (frames // 2) // model.cfg.audio.projector_stride
    return [projected[i, : int(n)] for i, n in enumerate(per_window)]


def _shortest_window(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    a = cfg.audio
    frames = 2 * a.projector_stride  # the shortest window that yields one audio token
    return torch.zeros(1, a.num_mel_bins, frames, device=device), torch.tensor([frames], device=device)


IMAGE = Encoder(
    inputs=("pixel_values",), tower="vision_tower", projectors=("vision_projector",),
    run_tower=_siglip_patches, project=lambda model, patches, _pixels: model.vision_projector(patches),
    dummy=_one_tile, checkpointed="vision_tower",
    builds={"vision_tower": lambda cfg, hf: SiglipVisionModel(hf["vision"]),
            "vision_projector": lambda cfg, hf: VisionProjector(cfg.vision.hidden_size, cfg.llm.hidden_size)},
)
VIDEO = Encoder(  # SigLIP per frame, the image projector's merge, one more 2x2 merge, the image MLP
    inputs=("video_pixel_values",), tower="vision_tower", projectors=("video_projector", "vision_projector"),
    run_tower=_siglip_patches,
    project=lambda model, patches, _pixels: model.video_projector(patches, model.vision_projector),
    dummy=_one_tile, checkpointed="vision_tower",
    builds={"video_projector": lambda cfg, hf: VideoProjector(cfg.vision.hidden_size)},
)
AUDIO = Encoder(
    inputs=("audio_mel", "audio_frames"), tower="audio_encoder", projectors=("audio_projector",),
    run_tower=lambda model, mel, frames: model.audio_encoder(mel, frames), project=_audio_window_tokens,
    dummy=_shortest_window, checkpointed="audio_encoder.encoder",
    builds={"audio_encoder": lambda cfg, hf: AudioEncoder(hf["audio"]),
            "audio_projector": lambda cfg, hf: ConvGMLPProjector(cfg.audio.d_model, cfg.llm.hidden_size,
                                                                 cfg.audio.projector_stride)},
)

# Kind -> entry. The order is the order every rank runs the towers in (see OmniModel.embed).
ENCODERS: dict[str, Encoder] = {"image": IMAGE, "video": VIDEO, "audio": AUDIO}


def media_inputs(encoders: dict[str, Encoder] = ENCODERS) -> frozenset[str]:
    """Every batch key some kind reads."""
    return frozenset(k for e in encoders.values() for k in e.inputs)
