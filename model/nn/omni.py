"""The omni model: SigLIP vision tower, Whisper audio encoder and a Qwen2 LLM, joined by projectors.

Media embeddings replace the placeholder tokens (`<img_pad>`, `<video_pad>`, `<audio_pad>`) in the
LLM's input embeddings; everything after that is an ordinary causal LM forward.

    image  -> AnyRes tiles + thumbnail -> SigLIP -> VisionProjector (2x2 merge, MLP) -> LLM
    video  -> SigLIP per frame -> VisionProjector merge -> extra 2x2 merge -> MLP -> LLM
    audio  -> log-mel -> Whisper encoder (any length) -> Conv-GMLP projector    -> LLM
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2ForCausalLM, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from model import runtime
from model.config import MODULES, ModelConfig
from model.nn import checkpoint
from model.nn.audio import AudioEncoder
from model.nn.hf import hf_configs
from model.nn.loading import TensorFiles, initialise_missing, load_tensors
from model.nn.loss import chunked_causal_lm_loss, per_sample_loss
from model.nn.projectors import ConvGMLPProjector, VideoProjector, VisionProjector


def build_llm(cfg: ModelConfig, vocab_size: int) -> Qwen2ForCausalLM:
    """The LLM alone (what the Triton entry model runs; the encoders are exported separately)."""
    return Qwen2ForCausalLM(hf_configs(cfg, vocab_size)[2])


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
    """`vocab_size` = the LLM's embedding rows. Modules named in `on_meta` are built on the meta
    device (no memory, no init) for a loader to fill (`model.nn.loading`); the rest get fresh weights."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, media_token_ids: dict[str, int],
                 on_meta: Collection[str] = (), stop_token_ids: list[int] | None = None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.media_token_ids = dict(media_token_ids)  # {"image": id of <img_pad>, "video": ..., "audio": ...}
        self.stop_token_ids = list(stop_token_ids or [])  # generation ends at any of these (empty: the tokenizer's)
        vision_cfg, audio_cfg, llm_cfg = hf_configs(cfg, vocab_size)
        v, a, h = cfg.vision.hidden_size, cfg.audio.d_model, cfg.llm.hidden_size

        def build(name: str, factory: Callable[[], nn.Module]) -> nn.Module:
            with torch.device("meta") if name in on_meta else nullcontext():
                return factory()

        self.vision_tower = build("vision_tower", lambda: SiglipVisionModel(vision_cfg))
        self.vision_projector = build("vision_projector", lambda: VisionProjector(v, h))
        self.video_projector = build("video_projector", lambda: VideoProjector(v))
        self.audio_encoder = build("audio_encoder", lambda: AudioEncoder(audio_cfg))
        self.audio_projector = build("audio_projector", lambda: ConvGMLPProjector(a, h, cfg.audio.projector_stride))
        self.llm = build("llm", lambda: Qwen2ForCausalLM(llm_cfg))
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

    # --- checkpoint format (model.nn.checkpoint): omni_config.json + safetensors + tokenizer/ ---
    def meta(self) -> dict:
        return {"model": self.cfg.model_dump(mode="json"), "vocab_size": self.vocab_size,
                "media_token_ids": self.media_token_ids, "stop_token_ids": self.stop_token_ids}

    def save_pretrained(self, path: str | Path, tokenizer=None, max_shard_size: int | str = "5GB") -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        checkpoint.write_meta(path, self.meta())
        checkpoint.save_weights(self.state_dict(), path, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path / checkpoint.TOKENIZER_DIR))
        return path

    @classmethod
    def from_config_file(cls, path: str | Path, on_meta: Collection[str] = ()) -> OmniModel:
        meta = checkpoint.read_meta(path)
        return cls(ModelConfig(**meta["model"]), meta["vocab_size"], meta["media_token_ids"], on_meta,
                   meta.get("stop_token_ids"))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> OmniModel:
        """Built on the meta device, every tensor read straight into place in `dtype` (default: the
        checkpoint's own). A weight the config expects but the checkpoint lacks is an error."""
        model = cls.from_config_file(path, on_meta=MODULES)
        files = TensorFiles(path)
        expected = set(model.state_dict())
        report = load_tensors(model, files, lambda k: k if k in expected else None, dtype or files.dtype())
        if report.unexpected:
            raise ValueError(f"checkpoint {path} does not match its config: unexpected {report.unexpected[:5]}")
        fresh = initialise_missing(model, dtype or files.dtype())
        if missing := sorted(set(fresh) & expected):
            raise ValueError(f"checkpoint {path} does not match its config: missing {missing[:5]}")
        return model
