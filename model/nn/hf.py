"""Our model config and Hugging Face's, both ways, and checkpoint tensor names to ours.

    hf_configs(cfg, rows)       -> the SiglipVisionConfig, WhisperConfig and Qwen2Config OmniModel builds
    architecture(part, config)  -> our config values a part's config.json fixes (hidden sizes, rope, ...)
    our_key(part, key)          -> where a checkpoint tensor goes in OmniModel, DROP, or None (unexpected)

Only configuration classes here (no torch models), so data prep can read a checkpoint's shape cheaply.
"""

from __future__ import annotations

from transformers import PretrainedConfig, Qwen2Config, SiglipVisionConfig, WhisperConfig

from model.config import FRESH_DEFAULTS, ModelConfig
from model.nn import attention
from model.runtime import attention_kernel

# What each part's config.json fixes in ours (model.<part>.<field>).
ARCH_FIELDS = {
    "llm": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rope_theta", "rope_scaling", "sliding_window", "max_window_layers",
            "vocab_size", "tie_word_embeddings", "rms_norm_eps"),
    "vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "num_channels"),
    "audio": ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
              "max_source_positions"),
}
MODEL_TYPES = {"llm": ("qwen2",), "vision": ("siglip", "siglip_vision_model"), "audio": ("whisper",)}
# Settings we do not model but build with a fixed value: a checkpoint that differs cannot be loaded faithfully.
FIXED = {"llm": {"hidden_act": "silu"}, "vision": {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
         "audio": {"activation_function": "gelu", "scale_embedding": False}}
DROP = "<drop>"  # a checkpoint tensor left out on purpose (text tower, Whisper decoder, ...)


def hf_configs(cfg: ModelConfig, rows: int) -> tuple[SiglipVisionConfig, WhisperConfig, Qwen2Config]:
    """The three towers' configs from a resolved model config; `rows` = the LLM's embedding rows."""
    v, a, m = (_filled(cfg, p) for p in ("vision", "audio", "llm"))
    vision = SiglipVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v["num_channels"],
        vision_use_head=False,  # the pooled head is unused (we take every patch) and would get no gradient
        **FIXED["vision"])
    audio = WhisperConfig(
        num_mel_bins=a["num_mel_bins"], d_model=a["d_model"], encoder_layers=a["encoder_layers"],
        encoder_attention_heads=a["encoder_attention_heads"], encoder_ffn_dim=a["encoder_ffn_dim"],
        max_source_positions=a["max_source_positions"], decoder_layers=1, decoder_attention_heads=1,
        **FIXED["audio"])
    llm = Qwen2Config(
        vocab_size=rows, hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"], max_position_embeddings=m["max_position_embeddings"],
        rope_parameters={"rope_type": "default", **(m["rope_scaling"] or {}), "rope_theta": m["rope_theta"]},
        use_sliding_window=m["sliding_window"] is not None, sliding_window=m["sliding_window"],
        max_window_layers=m["max_window_layers"] if m["max_window_layers"] is not None else m["num_hidden_layers"],
        tie_word_embeddings=m["tie_word_embeddings"], rms_norm_eps=m["rms_norm_eps"], **FIXED["llm"])
    attention.install()  # torch's varlen and flex kernels, by name, before a model asks for them
    llm._attn_implementation = attention_kernel(cfg.attn_implementation)
    vision._attn_implementation = "sdpa"  # tiles: one patch count, no mask
    # Whisper's windows of different lengths: unpadded through varlen where the LLM uses it, else
    # padded with a 4D additive mask through sdpa (model.nn.audio).
    audio._attn_implementation = "varlen" if llm._attn_implementation == "varlen" else "sdpa"
    return vision, audio, llm


def embedding_rows(cfg: ModelConfig, tokens: int) -> int:
    """The LLM's embedding (and LM head) rows: max(the checkpoint's rows, the tokenizer's length)."""
    return max(cfg.llm.vocab_size or 0, tokens)


def _filled(cfg: ModelConfig, part: str) -> dict:
    """A part's values with a fresh model's defaults where the config leaves them null."""
    values = cfg.part(part).model_dump()
    return values | {k: v for k, v in FRESH_DEFAULTS[part].items() if values.get(k) is None}


def part_config(part: str, config: PretrainedConfig) -> PretrainedConfig:
    """The config of the tower we build: SigLIP's vision half of a two-tower config."""
    if config.model_type not in MODEL_TYPES[part]:
        raise ValueError(f"model.init.{part}: a {config.model_type!r} checkpoint; expected model_type "
                         f"{' or '.join(MODEL_TYPES[part])}")
    return config.vision_config if config.model_type == "siglip" else config


def architecture(part: str, config: PretrainedConfig) -> dict:
    """Our model.<part> values from a checkpoint's (loaded) config.json; unmodelled settings must equal ours."""
    c = part_config(part, config)
    for key, ours in FIXED[part].items():
        if getattr(c, key, ours) != ours:
            raise ValueError(f"model.init.{part}: config.json has {key}={getattr(c, key)!r}; this platform builds "
                             f"the {part} with {key}={ours!r} and cannot load it faithfully")
    if part != "llm":
        return {f: getattr(c, f) for f in ARCH_FIELDS[part]}
    rope = dict(c.rope_parameters or {})
    theta = rope.pop("rope_theta", None)
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    window = c.sliding_window if getattr(c, "use_sliding_window", False) else None
    derived = ("rope_theta", "rope_scaling", "sliding_window", "max_window_layers")
    return {f: getattr(c, f) for f in ARCH_FIELDS["llm"] if f not in derived} | {
        "rope_theta": float(theta) if theta is not None else None, "rope_scaling": scaling, "sliding_window": window,
        "max_window_layers": c.max_window_layers if window is not None else None}


def our_key(part: str, key: str) -> str | None:
    """Where checkpoint tensor `key` of `part` goes in OmniModel: a name, DROP, or None (unexpected)."""
    if part == "llm":
        return f"llm.{key}" if key.startswith("model.") or key == "lm_head.weight" else None
    if part == "vision":  # two-tower and older vision-only repos say vision_model.*, transformers 5 saves it bare
        if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
            return DROP  # the text tower and the contrastive scale: unused by the omni model
        key = key.removeprefix("vision_model.")
        if key.startswith("head."):
            return DROP  # the pooled head: we take every patch
        return f"vision_tower.{key}" if key.startswith(("embeddings.", "encoder.", "post_layernorm.")) else None
    for prefix in ("model.encoder.", "encoder."):  # WhisperForConditionalGeneration, WhisperModel
        if key.startswith(prefix):
            return "audio_encoder.encoder." + key[len(prefix):]
    return DROP if key.startswith(("model.decoder.", "decoder.", "proj_out.")) else None
