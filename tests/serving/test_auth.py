"""Bearer-token auth of the predictor (serving/auth.py) on a small app with the same middleware."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, BearerTokenAuth, configured_token, websocket_token_matches


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    app.add_middleware(BearerTokenAuth, token="s3cret")

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.post("/openai/v1/chat/completions")
    def chat():
        return {"ok": True}

    return TestClient(app)


def test_requests_need_the_token_but_probes_do_not(client: TestClient) -> None:
    assert client.get("/v2/health/ready").status_code == 200
    missing = client.post("/openai/v1/chat/completions", json={})
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.post("/openai/v1/chat/completions", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    basic = client.post("/openai/v1/chat/completions", headers={"Authorization": "Basic s3cret"})
    assert basic.status_code == 401
    ok = client.post("/openai/v1/chat/completions", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json() == {"ok": True}


def test_token_comes_from_the_mounted_secret_file(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    assert configured_token({TOKEN_FILE_ENV: str(token)}) == "abc"
    assert configured_token({TOKEN_ENV: "xyz"}) == "xyz"
    assert configured_token({}) is None  # a laptop: open
    token.write_text("  ")
    with pytest.raises(RuntimeError, match="is empty"):
        configured_token({TOKEN_FILE_ENV: str(token)})
    with pytest.raises(RuntimeError, match="cannot read"):
        configured_token({TOKEN_FILE_ENV: str(tmp_path / "missing")})


def test_a_websocket_carries_the_token_in_its_header_or_as_a_browser_subprotocol() -> None:
    key = "openai-insecure-api-key."
    assert websocket_token_matches("Bearer s3cret", [], "s3cret")
    assert websocket_token_matches(None, ["realtime", key + "s3cret"], "s3cret")
    assert not websocket_token_matches(None, ["realtime"], "s3cret")  # none given
    assert not websocket_token_matches(None, [key + "s3cre"], "s3cret")
    assert not websocket_token_matches(None, [key + "s3cret", key + "other"], "s3cret")  # each one given is checked
    assert not websocket_token_matches("Bearer nope", [key + "s3cret"], "s3cret")
    assert not websocket_token_matches("", [key + "s3cret"], "s3cret")
