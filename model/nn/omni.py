"""The omni model: SigLIP vision tower, Whisper audio encoder and a Qwen2 LLM, joined by projectors.

Media embeddings replace the placeholder tokens (`<img_pad>`, `<video_pad>`, `<audio_pad>`) in the
LLM's input embeddings; everything after that is an ordinary causal LM forward.

    image  -> AnyRes tiles + thumbnail -> SigLIP -> VisionProjector (2x2 merge, MLP) -> LLM
    video  -> SigLIP per frame -> VisionProjector merge -> extra 2x2 merge -> MLP -> LLM
    audio  -> log-mel -> Whisper encoder (any length) -> Conv-GMLP projector    -> LLM
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from model import runtime
from model.config import MODULES, ModelConfig
from model.nn import attention, checkpoint
from model.nn.encoders import ENCODERS, Encoder, Features, media_inputs, tokens
from model.nn.hf import hf_configs
from model.nn.loading import TensorFiles, initialise_missing, load_tensors
from model.nn.loss import chunked_causal_lm_loss, per_sample_loss


def build_llm(cfg: ModelConfig, vocab_size: int) -> Qwen2ForCausalLM:
    """The LLM alone (what the Triton entry model runs; the encoders are exported separately)."""
    return Qwen2ForCausalLM(hf_configs(cfg, vocab_size)[2])


def splice_media(embeds: torch.Tensor, input_ids: torch.Tensor, features: dict[str, torch.Tensor | None],
                 media_token_ids: dict[str, int]) -> torch.Tensor:
    """Token embeddings with each kind's placeholder tokens replaced, in order, by its encoder's
    (tokens, dim) output, moved to the embeddings' device (an encoder may live elsewhere); the counts must
    match exactly."""
    for kind, feats in features.items():
        slots = input_ids == media_token_ids[kind]
        n_slots = int(slots.sum())
        n_feats = 0 if feats is None else feats.shape[0]
        if n_slots != n_feats:
            raise ValueError(f"{n_slots} {kind} placeholder tokens but the {kind} encoder produced {n_feats}")
        if n_feats:
            embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.device, embeds.dtype))
    return embeds


class OmniModel(nn.Module):
    """`vocab_size` = the LLM's embedding rows. Modules named in `on_meta` are built on the meta
    device (no memory, no init) for a loader to fill (`model.nn.loading`); the rest get fresh weights.

    The media side is `ENCODERS` (model.nn.encoders): each input kind's modules are built from its
    entry, and `embed` runs every kind the same way, so a new kind is one entry there."""

    ENCODERS: ClassVar[dict[str, Encoder]] = ENCODERS

    def __init__(self, cfg: ModelConfig, vocab_size: int, media_token_ids: dict[str, int],
                 on_meta: Collection[str] = (), stop_token_ids: list[int] | None = None):
        super().__init__()
        if missing := [kind for kind in self.ENCODERS if kind not in media_token_ids]:
            raise ValueError(f"media_token_ids has no placeholder token id for {missing}: every input kind "
                             f"({', '.join(self.ENCODERS)}) needs one")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.media_token_ids = dict(media_token_ids)  # {"image": id of <img_pad>, "video": ..., "audio": ...}
        self.stop_token_ids = list(stop_token_ids or [])  # generation ends at any of these (empty: the tokenizer's)
        hf = dict(zip(("vision", "audio", "llm"), hf_configs(cfg, vocab_size), strict=True))

        def build(name: str, factory: Callable[[], nn.Module]) -> nn.Module:
            with torch.device("meta") if name in on_meta else nullcontext():
                return factory()

        for encoder in self.ENCODERS.values():
            for name, builder in encoder.builds.items():
                self.add_module(name, build(name, partial(builder, cfg, hf)))
        self.llm = build("llm", lambda: Qwen2ForCausalLM(hf["llm"]))
        # Parameters the towers freeze by design (Whisper's sinusoidal positions): no stage trains them.
        self.fixed_parameters = frozenset(n for n, p in self.named_parameters() if not p.requires_grad)
        self.media_inputs = media_inputs(self.ENCODERS)

    @property
    def varlen(self) -> bool:
        """True when the LLM's kernel takes packed rows as one unpadded row bounded by cu_seq_lens
        (flash_attention_2, torch's varlen, flex: model.nn.attention), with no (seq x seq) mask."""
        return self.llm.config._attn_implementation in attention.PACKED_KERNELS

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer layer's activations in backward (every kind's tower, the LLM):
        activation memory drops to about one layer's worth, for ~30% more compute."""
        towers = dict.fromkeys(self.get_submodule(e.checkpointed) for e in self.ENCODERS.values())
        for tower in (*towers, self.llm):
            if enabled:  # non-reentrant: works when a frozen tower's inputs need no grad
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.activation_checkpointing_disable()

    def encode(self, kind: str, *inputs: torch.Tensor) -> Features:
        """One kind's media (its entry's `inputs`, in order) -> (items, tokens, llm_dim), or one
        (tokens, llm_dim) per item (audio windows). In training, a tower whose weights are all frozen
        runs under no_grad: a projector that trains needs its output, not its graph; and the
        projectors too when they are frozen (nothing upstream of them trains then)."""
        encoder = self.ENCODERS[kind]
        with self._no_graph_if_frozen(encoder.tower):
            hidden = encoder.run_tower(self, *inputs)
        with self._no_graph_if_frozen(encoder.tower, *encoder.projectors):
            return encoder.project(self, hidden, *inputs)

    def _no_graph_if_frozen(self, *modules: str) -> AbstractContextManager:
        trains = any(p.requires_grad for name in modules for p in self.get_submodule(name).parameters())
        return torch.no_grad() if self.training and not trains else nullcontext()

    def embed(self, input_ids: torch.Tensor, **media: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every media placeholder replaced by its kind's encoder output, in
        order. `media`: the batch keys of `ENCODERS` (the collator's: pixel_values, audio_mel, ...)."""
        if unknown := sorted(set(media) - self.media_inputs):
            raise TypeError(f"unknown media inputs {unknown}; the encoders read {sorted(self.media_inputs)}")
        embeds = self.llm.get_input_embeddings()(input_ids)
        lockstep = self._lockstep()
        features: dict[str, torch.Tensor | None] = {}
        for kind, encoder in self.ENCODERS.items():
            given = [media.get(key) for key in encoder.inputs]
            if all(x is None for x in given):
                features[kind] = None
                if lockstep:
                    embeds = embeds + self._dummy_pass(kind, input_ids.device)
                continue
            if missing := [k for k, x in zip(encoder.inputs, given, strict=True) if x is None]:
                raise ValueError(f"{kind} input {missing} missing: {kind} needs {list(encoder.inputs)} together")
            features[kind] = tokens(self.encode(kind, *given))
        return splice_media(embeds, input_ids, features, self.media_token_ids)

    def _lockstep(self) -> bool:
        """Whether `embed` runs every kind on every micro-batch (`_dummy_pass`): in training with
        several data-parallel ranks, or with ZeRO-3's partitioned parameters (DeepSpeed marks them
        with `ds_id`) even in one process: there, a trained projector behind a frozen tower that was
        skipped in some micro-batches of an accumulated step got another update than under ZeRO-2 or
        on two ranks (tests/model/training/test_mixed_modalities.py's one-process reference)."""
        partitioned = hasattr(self.llm.get_input_embeddings().weight, "ds_id")
        return self.training and (runtime.ranks().world_size > 1 or partitioned)

    def _dummy_pass(self, kind: str, device: torch.device) -> torch.Tensor:
        """0 x the output of `kind`'s encoder on its cheapest input, for a batch that lacks the kind.

        Data-parallel ranks draw different samples, but DeepSpeed needs every rank to run the same
        parameters in the same order every step: ZeRO-3 gathers each module's parameters with a
        collective as it runs, and ZeRO-1/2 reduce gradients in buckets built from the parameters that
        got one. So `embed` runs every kind's encoder exactly once per micro-batch, in `ENCODERS`
        order, whatever a rank holds: all of a kind's items in one call, or this pass where it has
        none. It costs one tile, frame or 40 ms window, and adds exactly zero to the loss and to every
        gradient."""
        return 0.0 * tokens(self.encode(kind, *self.ENCODERS[kind].dummy(self.cfg, device))).sum()

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, **inputs):
        """The LM forward over spliced embeddings. `inputs`: the media (keys of `ENCODERS`' inputs)
        and attention kwargs for the attention layers (flash-attention's cu_seq_lens / max_length
        from the packing collator). With labels and a chunked loss (`model.loss_chunk_tokens`), the
        output carries the loss and no logits."""
        media = {k: inputs.pop(k) for k in list(inputs) if k in self.media_inputs}
        embeds = self.embed(input_ids, **media)
        if attention_mask is None and self.varlen and "cu_seq_lens_q" in inputs:  # packed: no mask
            attention_mask = attention.no_mask(self.llm.config)
        common = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False, **inputs}
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
