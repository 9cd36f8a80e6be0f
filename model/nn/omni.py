"""The omni model: SigLIP vision tower, Whisper audio encoder and a Qwen2 LLM, joined by projectors.

Media embeddings replace the placeholder tokens (`<img_pad>`, `<video_pad>`, `<audio_pad>`) in the
LLM's input embeddings; everything after that is an ordinary causal LM forward.

    image  -> AnyRes tiles + thumbnail -> SigLIP -> VisionProjector (2x2 merge, MLP) -> LLM
    video  -> SigLIP per frame -> VisionProjector merge -> extra 2x2 merge -> MLP -> LLM
    audio  -> log-mel -> Whisper encoder (any length) -> Conv-GMLP projector    -> LLM
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel, WhisperConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from model import runtime
from model.config import ModelConfig
from model.nn import checkpoint
from model.nn.audio import AudioEncoder
from model.nn.loss import chunked_causal_lm_loss, per_sample_loss
from model.nn.projectors import ConvGMLPProjector, VideoProjector, VisionProjector
from model.runtime import attention_kernel


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
    llm._attn_implementation = attention_kernel(cfg.attn_implementation)
    return vision, audio, llm


def build_llm(cfg: ModelConfig, vocab_size: int) -> Qwen2ForCausalLM:
    """The LLM alone (what the Triton entry model runs; the encoders are exported separately)."""
    return Qwen2ForCausalLM(_hf_configs(cfg, vocab_size)[2])


def splice_media(embeds: torch.Tensor, input_ids: torch.Tensor, features: dict[str, torch.Tensor | None],
                 media_token_ids: dict[str, int]) -> torch.Tensor:
    """Token embeddings with each kind's placeholder tokens replaced, in order, by its encoder's
    (tokens, dim) output; the counts must match exactly."""
    for kind, feats in features.items():
        slots = input_ids == media_token_ids[kind]
        n_slots = int(slots.sum())
        n_feats = 0 if feats is None else feats.shape[0]
        if n_slots != n_feats:
            raise ValueError(f"{n_slots} {kind} placeholder tokens but the {kind} encoder produced {n_feats}")
        if n_feats:
            embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
    return embeds


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
        if self.training and runtime.ranks().world_size > 1:
            embeds = embeds + self._unused_towers(features, input_ids.device)
        return splice_media(embeds, input_ids, features, self.media_token_ids)

    def _unused_towers(self, features: dict[str, torch.Tensor | None], device: torch.device) -> torch.Tensor:
        """0 x the output of every encoder whose media this batch lacks, run on a dummy input.

        Data-parallel ranks draw different samples, but DeepSpeed needs every rank to run the same
        parameters every step: ZeRO-3 gathers each parameter with a collective in forward, and
        ZeRO-1/2 reduce gradients in buckets built from the parameters that got one. A rank whose
        micro-batch has no image would skip the vision tower's gathers, and its gradients would pair
        with another rank's wrong tensors. The dummy pass costs one tile, frame or 40 ms window, and
        adds exactly zero to the loss and to every gradient."""
        v, a = self.cfg.vision, self.cfg.audio
        pixels = torch.zeros(1, v.num_channels, v.image_size, v.image_size, device=device)
        dummy = torch.zeros((), device=device)
        if features["image"] is None:
            dummy = dummy + self.encode_images(pixels).sum()
        if features["video"] is None:
            dummy = dummy + self.encode_video_frames(pixels).sum()
        if features["audio"] is None:
            frames = 2 * a.projector_stride  # the shortest window that yields one audio token
            mel = torch.zeros(1, a.num_mel_bins, frames, device=device)
            dummy = dummy + torch.cat(self.encode_audio(mel, torch.tensor([frames], device=device))).sum()
        return dummy * 0.0

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, pixel_values=None,
                video_pixel_values=None, audio_mel=None, audio_frames=None, **attention_kwargs):
        """The LM forward over spliced embeddings. `attention_kwargs` go to the attention layers
        (flash-attention's cu_seq_lens / max_length from the packing collator). With labels and a
        chunked loss (`model.loss_chunk_tokens`), the output carries the loss and no logits."""
        embeds = self.embed(input_ids, pixel_values, video_pixel_values, audio_mel, audio_frames)
        common = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False,
                  **attention_kwargs}
        chunk = self.loss_chunk_tokens
        if labels is None or not chunk:
            return self.llm(inputs_embeds=embeds, labels=labels, **common)
        hidden = self.llm.model(inputs_embeds=embeds, **common).last_hidden_state
        return CausalLMOutputWithPast(loss=chunked_causal_lm_loss(hidden, labels, self.llm.lm_head, chunk))

    def sample_losses(self, input_ids, labels, attention_mask=None, position_ids=None, **media) -> torch.Tensor:
        """(B,) mean loss of each sample over its labelled tokens, without the full logits (SFT filter)."""
        embeds = self.embed(input_ids, **media)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        return per_sample_loss(hidden, labels, self.llm.lm_head, self.loss_chunk_tokens)

    @property
    def loss_chunk_tokens(self) -> int:
        """Target tokens per chunk of the LM-head loss; 0 = the plain loss (see ModelConfig)."""
        return self.cfg.loss_chunk(self.vocab_size)

    # --- checkpoint format (model.nn.checkpoint): omni_config.json + model.safetensors + tokenizer/ ---
    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        checkpoint.write_meta(path, {"model": self.cfg.model_dump(), "vocab_size": self.vocab_size,
                                     "media_token_ids": self.media_token_ids})
        checkpoint.save_weights(self.state_dict(), path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path / checkpoint.TOKENIZER_DIR))
        return path

    @classmethod
    def from_config_file(cls, path: str | Path) -> OmniModel:
        meta = checkpoint.read_meta(path)
        return cls(ModelConfig(**meta["model"]), meta["vocab_size"], meta["media_token_ids"])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OmniModel:
        model = cls.from_config_file(path)
        missing, unexpected = model.load_state_dict(checkpoint.load_weights(path), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not model.cfg.llm.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model
