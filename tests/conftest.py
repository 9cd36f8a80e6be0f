"""Shared test setup: one thread (timings on a busy 2-core machine swing wildly otherwise), the
DeepSpeed op cache in the repo, and the tiny model config + tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.text.tokenizer import train_tokenizer  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tokenizer():
    words = "what color is the shape red green blue yellow describe transcribe the audio one two three A B C D"
    return train_tokenizer([words] * 20, 400)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, the whole-DAG e2e first of all, each file's own order kept: with
    pytest-xdist (`make test`) the minutes-long files then start at once on their own workers
    instead of finishing alone after everything else."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path.name != "test_e2e.py", item.path not in slow_files))
