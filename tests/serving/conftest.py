"""A tiny untrained checkpoint per test module (its own random weights), for the real servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.nn.omni import OmniModel
from model.text.processor import OmniProcessor


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory, tiny_cfg, tokenizer) -> Path:
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "ckpt"
    processor = OmniProcessor(tokenizer, tiny_cfg)
    OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).save_pretrained(path, tokenizer)
    return path
