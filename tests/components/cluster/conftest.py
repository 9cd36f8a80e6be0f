"""tests/components/cluster: fakes and a config for the cluster-side code (no API server, no Docker)."""

from __future__ import annotations

import pytest

from components.cluster.kube import Kube
from components.config import load_config
from tests.components.cluster.fake_kube import FakeCore, FakeCustomObjects


@pytest.fixture(scope="session")
def cfg():
    return load_config()


@pytest.fixture
def fake_kube():
    """A Kube over the in-process fakes; set `.custom.controller` to play the controller."""
    return Kube(custom=FakeCustomObjects(), core=FakeCore())
