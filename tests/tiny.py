"""The tiny omni model the tests build: the config in conf/model/tiny.yaml, a tokenizer trained on a
few words, its processor, a seeded model. Plain functions, so worker scripts run under torchrun can
use them as well as fixtures."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from model.config import ModelConfig
from model.nn.omni import OmniModel
from model.text.processor import OmniProcessor
from model.text.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_config() -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")))


def tiny_model(words: str, seed: int = 0):
    """(config, tokenizer, processor, model) for a tokenizer trained on `words`."""
    cfg = tiny_config()
    tokenizer = train_tokenizer([words] * 20, 400)
    processor = OmniProcessor(tokenizer, cfg)
    torch.manual_seed(seed)
    return cfg, tokenizer, processor, OmniModel(cfg, len(tokenizer), processor.placeholder_ids)
