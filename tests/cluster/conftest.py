"""tests/cluster: fakes and a config for the cluster-side code (no API server, no Docker)."""

from __future__ import annotations

import pytest

from components.kube import Kube
from pipelines.config import load_config
from tests.cluster.fake_kube import FakeCore, FakeCustomObjects


@pytest.fixture(scope="session")
def cfg():
    return load_config()


@pytest.fixture
def fake_kube():
    """A Kube over the in-process fakes; set `.custom.controller` to play the controller."""
    return Kube(custom=FakeCustomObjects(), core=FakeCore())
