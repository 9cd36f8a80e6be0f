"""Fixtures shared by the engine's tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def encoder_calls(chat, monkeypatch) -> dict[str, int]:
    """Calls of the model's encoders by kind (the test module's `chat`), counted as they happen."""
    calls = {"image": 0, "video": 0, "audio": 0}
    real = chat.model.encode

    def counted(kind, *inputs):
        calls[kind] += 1
        return real(kind, *inputs)

    monkeypatch.setattr(chat.model, "encode", counted)
    return calls
