"""Pydantic schemas for everything `model/` needs: architecture, training stages, data, evaluation.

These are the validated shape of the Hydra tree in `conf/`. Unknown keys are errors
(`extra="forbid"`) so a typo in an override fails with the field's name instead of being ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class LLMConfig(Strict):
    """Qwen2-architecture causal LM. `vocab_size=None` means: take it from the tokenizer."""

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6

    @model_validator(mode="after")
    def _heads_divide(self) -> LLMConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("llm.hidden_size must be divisible by llm.num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("llm.num_attention_heads must be divisible by llm.num_key_value_heads")
        return self


class VisionConfig(Strict):
    """SigLIP vision tower. The 2x2 merge of the projector needs an even patch grid; an odd grid
    (27x27 at 384/14) is padded by one row and column before merging."""

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return ((self.grid + 1) // 2) ** 2


class VideoConfig(Strict):
    fps: float = Field(1.0, gt=0, description="frames sampled per second of video (paper: 1)")
    max_frames: int = Field(48, gt=0, description="upper bound on sampled frames (paper: 48)")


class AudioConfig(Strict):
    """Whisper encoder + Conv-GMLP projector. Any input length: the positional table is sliced."""

    num_mel_bins: int = 128
    d_model: int = Field(gt=0)
    encoder_layers: int = Field(gt=0)
    encoder_attention_heads: int = Field(gt=0)
    encoder_ffn_dim: int = Field(gt=0)
    max_source_positions: int = 1500
    projector_stride: Literal[2, 4, 8] = 4
    sampling_rate: int = 16000
    max_seconds: float = Field(30.0, gt=0)


class TokenizerConfig(Strict):
    """`path` loads a checkpoint's tokenizer; otherwise a byte-level BPE is trained locally."""

    path: str | None = None
    vocab_size: int = 1024


class ModelConfig(Strict):
    name: str
    llm: LLMConfig
    vision: VisionConfig
    video: VideoConfig = VideoConfig()
    audio: AudioConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    pretrained: str | None = Field(None, description="omni checkpoint dir to start from; null = fresh weights")
    max_seq_len: int = Field(512, gt=0)


MODULES = ("vision_tower", "vision_projector", "video_projector", "audio_encoder", "audio_projector", "llm")


class StageConfig(Strict):
    """One training stage: which modules learn (the rest are frozen), at what learning rate."""

    name: str
    trainable: list[str] = Field(min_length=1)
    lr: float = Field(gt=0)
    lr_overrides: dict[str, float] = Field(default_factory=dict, description="per-module learning rate")
    data_tasks: list[str] = Field(min_length=1, description="record `task` values this stage trains on")
    steps: int = Field(gt=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    checkpoint_every: int = Field(
        0, ge=0, description="optimizer steps between DeepSpeed checkpoints; 0 = none (a SIGTERM still saves one)")
    seed: int = 0
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    packing: bool = Field(False, description="pack several samples per row up to model.max_seq_len, "
                                             "attention isolated per sample; micro_batch_size counts rows")

    @model_validator(mode="after")
    def _known_modules(self) -> StageConfig:
        for name in [*self.trainable, *self.lr_overrides]:
            if name not in MODULES:
                raise ValueError(f"stage {self.name!r}: unknown module {name!r}; choose from {', '.join(MODULES)}")
        return self


class DataConfig(Strict):
    """Demo data generation and data-prep settings."""

    demo_images: int = Field(160, ge=0)
    demo_videos: int = Field(80, ge=0)
    demo_audios: int = Field(120, ge=0)
    demo_texts: int = Field(80, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 30.0
    max_video_seconds: float = 120.0


class EvalConfig(Strict):
    max_new_tokens: int = Field(16, gt=0)
    batch_size: int = Field(8, gt=0)
    max_samples: int | None = None
