"""The named model sizes of `make bench-gpu` (benchmarks/bench_gpu.py), one definition for the serving
and the training parts: fresh weights, nothing to download."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "1.5b", "7b")
# Qwen2-1.5B's shape (its config.json) on the paper's encoders (conf/model/omni-7b.yaml): 2.91B
# parameters with the LM head untied from the embedding, as the baseline figures were measured.
QWEN2_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
              "vocab_size": 151936, "tie_word_embeddings": False}


def size_config(size: str) -> ModelConfig:
    """The named size's model config: tiny and 7b are conf/model's files, 1.5b the 7b file with
    Qwen2-1.5B's LLM and vocabulary."""
    name = "tiny" if size == "tiny" else "omni-7b"
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")))
    if size == "1.5b":
        vocab = cfg.tokenizer.model_copy(update={"vocab_size": QWEN2_1_5B["vocab_size"]})
        cfg = cfg.model_copy(update={"name": "omni-1.5b", "llm": cfg.llm.model_copy(update=QWEN2_1_5B),
                                     "tokenizer": vocab})
    return cfg
