"""The omni model: SigLIP vision tower, Whisper audio encoder and a Qwen2 LLM, joined by projectors.

Media embeddings replace the placeholder tokens (`<img_pad>`, `<video_pad>`, `<audio_pad>`) in the
LLM's input embeddings; everything after that is an ordinary causal LM forward.

    image  -> AnyRes tiles + thumbnail -> SigLIP -> VisionProjector (2x2 merge, MLP) -> LLM
    video  -> SigLIP per frame -> VisionProjector merge -> extra 2x2 merge -> MLP -> LLM
    audio  -> log-mel -> Whisper encoder (any length) -> Conv-GMLP projector    -> LLM
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from model.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "omni_config.json", "model.safetensors", "tokenizer"


def _square(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, N, C) patch tokens -> (B, C, g, g) grid."""
    b, n, c = x.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"expected a square patch grid, got {n} tokens")
    return x.transpose(1, 2).reshape(b, c, g, g), g


def merge_2x2_padded(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(B, g*g, C) -> (B, ceil(g/2)^2, C') through a 2x2 stride-2 conv; an odd grid is zero-padded by
    one row and column first. The output is again a square grid (the video path merges it twice)."""
    grid, g = _square(x)
    if g % 2:
        grid = F.pad(grid, (0, 1, 0, 1))
    return conv(grid).flatten(2).transpose(1, 2)


def merge_2x2(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(B, g*g, C) -> (B, floor(g^2/4), C'): every output token merges 4 neighbouring patches.

    Even grids are tiled by 2x2 squares. An odd grid g = 2k+1 (27x27 for SigLIP-384/14) is handled
    without padding tokens or dropping patches: the (g-1)^2 interior is tiled by 2x2 squares (k^2
    tokens), and the L-shaped border (last column top to bottom, then last row right to left, a path
    of 2g-1 = 4k+1 adjacent patches) is cut into k runs of 4, each run laid out as a 2x2 window for
    the same conv; the path's final patch is averaged into its neighbour at the end of the last run.
    That is k^2 + k tokens: 729 patches -> 182, the paper's count."""
    grid, g = _square(x)
    if g % 2 == 0:
        return conv(grid).flatten(2).transpose(1, 2)
    b, c, k = grid.shape[0], grid.shape[1], g // 2
    inner = conv(grid[:, :, : g - 1, : g - 1]).flatten(2).transpose(1, 2)  # (B, k^2, C')
    path = torch.cat([grid[:, :, :, g - 1], grid[:, :, g - 1, : g - 1].flip(-1)], dim=2)  # (B, C, 4k+1)
    runs = path[:, :, : 4 * k].clone()
    runs[:, :, -1] = (path[:, :, -2] + path[:, :, -1]) / 2
    windows = runs.reshape(b, c, k, 2, 2).permute(0, 2, 1, 3, 4).reshape(b * k, c, 2, 2)
    border = conv(windows).reshape(b, k, -1)
    return torch.cat([inner, border], dim=1)


class VisionProjector(nn.Module):
    """2x2 stride-2 merge of neighbouring patches, then a 2-layer MLP into the LLM width."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.merge = nn.Conv2d(vision_dim, vision_dim, kernel_size=2, stride=2)
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(merge_2x2(patches, self.merge))


class VideoProjector(nn.Module):
    """The image projector plus one more 2x2 merge: 4x fewer tokens per frame than an image.
    Shares the image projector's weights; only `extra_merge` is its own (the paper's video stage
    trains this module alone)."""

    def __init__(self, vision_dim: int):
        super().__init__()
        self.extra_merge = nn.Conv2d(vision_dim, vision_dim, kernel_size=2, stride=2)

    def forward(self, patches: torch.Tensor, image_projector: VisionProjector) -> torch.Tensor:
        # Padded, not folded: the first merge must leave a square grid for the second.
        once = merge_2x2_padded(patches, image_projector.merge)
        return image_projector.mlp(merge_2x2_padded(once, self.extra_merge))


class ConvGMLPProjector(nn.Module):
    """Conv-GMLP audio projector (Baichuan-Omni): two parallel Conv1d with kernel = stride = n widen
    the channels n-fold; one passes through SiLU and gates the other; a linear layer projects down;
    a linear shortcut of the reshaped input (n frames stacked) is added; LayerNorm on the sum.
    Downsamples the 50 Hz encoder output n-fold (n=4: 12.5 tokens per second)."""

    def __init__(self, audio_dim: int, llm_dim: int, stride: int):
        super().__init__()
        self.stride = stride
        wide = audio_dim * stride
        self.gate = nn.Conv1d(audio_dim, wide, kernel_size=stride, stride=stride)
        self.value = nn.Conv1d(audio_dim, wide, kernel_size=stride, stride=stride)
        self.down = nn.Linear(wide, llm_dim)
        self.shortcut = nn.Linear(wide, llm_dim)
        self.norm = nn.LayerNorm(llm_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, c = frames.shape
        t = t - t % self.stride  # trailing frames that do not fill a window carry no full token
        frames = frames[:, :t]
        x = frames.transpose(1, 2)
        gated = F.silu(self.gate(x)) * self.value(x)
        stacked = frames.reshape(b, t // self.stride, c * self.stride)
        return self.norm(self.down(gated.transpose(1, 2)) + self.shortcut(stacked))


class AudioEncoder(nn.Module):
    """Whisper encoder that accepts any number of mel frames (<= 2 * max_source_positions).

    The stock forward insists on exactly 30 s of (padded) input; here the positional table is
    sliced to the input length, so a 2 s clip costs 2 s of compute. Padding inside a batch is masked.
    """

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.encoder = WhisperEncoder(cfg)

    def forward(self, mel: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.encoder
        x = F.gelu(enc.conv1(mel.to(enc.conv1.weight.dtype)))  # features come in fp32; weights may be bf16
        if frames is not None:
            # Zero what conv1 made of the padding, so conv2 sees at the edge what an unpadded clip sees.
            x = x * (torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None])[:, None, :]
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        t = x.shape[1]
        if t > enc.embed_positions.num_embeddings:
            raise ValueError(f"audio window of {t} frames exceeds the encoder's {enc.embed_positions.num_embeddings}")
        x = x + enc.embed_positions.weight[:t]
        mask = None
        if frames is not None:  # frames: valid mel frames per item -> valid encoder positions
            valid = torch.arange(t, device=x.device)[None, :] < ((frames + 1) // 2)[:, None]
            mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in enc.layers:
            x = layer(x, mask)
            x = x[0] if isinstance(x, tuple) else x
        return enc.layer_norm(x)


def _hf_configs(cfg: ModelConfig, vocab_size: int) -> tuple[SiglipVisionConfig, WhisperConfig, Qwen2Config]:
    v, a, m = cfg.vision, cfg.audio, cfg.llm
    vision = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels,
        vision_use_head=False,  # the pooled head is unused (we take every patch) and would get no gradient
    )
    audio = WhisperConfig(
        num_mel_bins=a.num_mel_bins, d_model=a.d_model, encoder_layers=a.encoder_layers,
        encoder_attention_heads=a.encoder_attention_heads, encoder_ffn_dim=a.encoder_ffn_dim,
        max_source_positions=a.max_source_positions, decoder_layers=1, decoder_attention_heads=1,
    )
    llm = Qwen2Config(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings, rms_norm_eps=m.rms_norm_eps,
    )
    for c in (vision, audio):
        c._attn_implementation = "sdpa"  # the audio path hands its layers a 4D additive mask
    llm._attn_implementation = llm_attention(cfg.attn_implementation)
    return vision, audio, llm


def llm_attention(choice: str) -> str:
    """Resolve `model.attn_implementation`: "auto" takes flash-attention where it can run."""
    if choice != "auto":
        return choice
    import importlib.util

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "flash_attention_2" if gpu_bf16 and importlib.util.find_spec("flash_attn") else "sdpa"


class OmniModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, media_token_ids: dict[str, int]):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.media_token_ids = dict(media_token_ids)  # {"image": id of <img_pad>, "video": ..., "audio": ...}
        vision_cfg, audio_cfg, llm_cfg = _hf_configs(cfg, vocab_size)
        self.vision_tower = SiglipVisionModel(vision_cfg)
        self.vision_projector = VisionProjector(cfg.vision.hidden_size, cfg.llm.hidden_size)
        self.video_projector = VideoProjector(cfg.vision.hidden_size)
        self.audio_encoder = AudioEncoder(audio_cfg)
        self.audio_projector = ConvGMLPProjector(cfg.audio.d_model, cfg.llm.hidden_size, cfg.audio.projector_stride)
        self.llm = Qwen2ForCausalLM(llm_cfg)
        # Parameters the towers freeze by design (Whisper's sinusoidal positions): no stage trains them.
        self.fixed_parameters = frozenset(n for n, p in self.named_parameters() if not p.requires_grad)

    @property
    def varlen(self) -> bool:
        """True when the LLM runs flash-attention: packed rows go unpadded, bounded by position ids."""
        return self.llm.config._attn_implementation == "flash_attention_2"

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer layer's activations in backward (vision tower, audio encoder,
        LLM): activation memory drops to about one layer's worth, for ~30% more compute."""
        for tower in (self.vision_tower, self.audio_encoder.encoder, self.llm):
            if enabled:  # non-reentrant: works when a frozen tower's inputs need no grad
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.activation_checkpointing_disable()

    # --- media encoders: each returns (num_items, tokens_per_item, llm_dim) or a flat token list ---
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        return self.vision_projector(patches)

    def encode_video_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        return self.video_projector(patches, self.vision_projector)

    def encode_audio(self, mel: torch.Tensor, frames: torch.Tensor) -> list[torch.Tensor]:
        """Padded windows (W, bins, T) with valid lengths -> one (tokens, llm_dim) tensor per window."""
        tokens = self.audio_projector(self.audio_encoder(mel, frames))
        per_window = (frames // 2) // self.cfg.audio.projector_stride
        return [tokens[i, : int(n)] for i, n in enumerate(per_window)]

    def embed(self, input_ids: torch.Tensor, pixel_values=None, video_pixel_values=None,
              audio_mel=None, audio_frames=None) -> torch.Tensor:
        """Token embeddings with every media placeholder replaced by its encoder output, in order."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        features = {
            "image": self.encode_images(pixel_values).flatten(0, 1) if pixel_values is not None else None,
            "video": self.encode_video_frames(video_pixel_values).flatten(0, 1)
            if video_pixel_values is not None else None,
            "audio": torch.cat(self.encode_audio(audio_mel, audio_frames)) if audio_mel is not None else None,
        }
        for kind, feats in features.items():
            slots = input_ids == self.media_token_ids[kind]
            n_slots = int(slots.sum())
            n_feats = 0 if feats is None else feats.shape[0]
            if n_slots != n_feats:
                raise ValueError(f"{n_slots} {kind} placeholder tokens but the {kind} encoder produced {n_feats}")
            if n_feats:
                embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
        return embeds

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, **media):
        embeds = self.embed(input_ids, **media)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, use_cache=False)

    # --- checkpoint format: omni_config.json + model.safetensors + tokenizer/ ---
    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"model": self.cfg.model_dump(), "vocab_size": self.vocab_size, "media_token_ids": self.media_token_ids}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(_untie(state), str(path / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        return path

    @classmethod
    def from_config_file(cls, path: str | Path) -> OmniModel:
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
        return cls(ModelConfig(**meta["model"]), meta["vocab_size"], meta["media_token_ids"])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OmniModel:
        model = cls.from_config_file(path)
        missing, unexpected = model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not model.cfg.llm.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): store a copy."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
