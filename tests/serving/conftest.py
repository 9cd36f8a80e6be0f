"""A tiny untrained checkpoint per test module, for the real servers. Its random weights are seeded:
what an untrained model happens to generate (a character split across tokens, the biased-out end
token on top) must not decide whether a test passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.nn.omni import OmniModel
from model.text.processor import OmniProcessor


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory, tiny_cfg, tokenizer) -> Path:
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "ckpt"
    processor = OmniProcessor(tokenizer, tiny_cfg)
    torch.manual_seed(0)
    OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).save_pretrained(path, tokenizer)
    return path
