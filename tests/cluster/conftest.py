"""tests/cluster: fakes and a config for the cluster-side code (no API server, no Docker)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_kube

from fake_kube import FakeCore, FakeCustomObjects  # noqa: E402

from components.kube import Kube  # noqa: E402
from pipelines.config import load_config  # noqa: E402


@pytest.fixture(scope="session")
def cfg():
    return load_config()


@pytest.fixture
def fake_kube():
    """A Kube over the in-process fakes; set `.custom.controller` to play the controller."""
    return Kube(custom=FakeCustomObjects(), core=FakeCore())
