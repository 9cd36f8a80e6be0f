"""`/v1/realtime` on a real server on 127.0.0.1 with a real WebSocket client: a spoken question streamed
faster than real time is heard (speech started / stopped) and answered in text deltas; barge-in and
`response.cancel` stop an answer; a wrong token is refused; malformed and unknown events, and each
configured limit, get an `error` event and the session goes on."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from model.media.decode import load_audio
from model.nn.omni import OmniModel
from model.text.processor import OmniProcessor
from serving.config import ServingConfig
from serving.local import metric, start_server

# serving.predictor and the realtime protocol import kserve: imported in the tests that run in
# process, never at collection (kserve's protobufs clash with tritonclient.grpc's, loaded by others).
from tests.serving.test_predictor import png_bytes

TOKEN = "rt-test-token-5d1e"
RATE = 24000  # the client's rate (OpenAI's); the server resamples
CHUNK_S = 0.1
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()


@pytest.fixture(scope="module")
def endless(tmp_path_factory, tiny_cfg, tokenizer) -> Path:
    """The tiny model with a stop set it can never sample: every answer runs to its token budget, so a
    cancelled answer is one that was cut, whatever the random weights say."""
    path = tmp_path_factory.mktemp("realtime") / "ckpt"
    processor = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids, stop_token_ids=[10**9])
    model.save_pretrained(path, tokenizer)
    return path


@pytest.fixture(scope="module")
def live(endless):
    # Images up to 48x48 (the test image is 24x24): a larger one is over a limit.
    config = {"max_new_tokens": 6, "limits": {"max_image_pixels": 48 * 48},
              "realtime": {"max_event_bytes": 200_000, "max_buffered_audio_s": 5.0, "max_events_per_s": 80.0}}
    server = start_server(endless, endless.parent / "rt", config, env={"OMNI_API_TOKEN": TOKEN})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """A spoken question (espeak-ng, as the demo data) at the client's rate, with silence around it."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "150", "what color is the shape"], check=True,
                         capture_output=True).stdout
    voice = (load_audio(wav, RATE) * 32767).astype(np.int16)
    silence = np.zeros(int(RATE * 0.6), np.int16)
    return np.concatenate([silence, voice, silence, silence, silence])


def _url(live) -> str:
    return live.base.replace("http://", "ws://") + "/v1/realtime"


def _pcm(samples: np.ndarray) -> str:
    return base64.b64encode(samples.astype("<i2").tobytes()).decode()


def _chunks(samples: np.ndarray):
    step = int(RATE * CHUNK_S)
    return [samples[i:i + step] for i in range(0, len(samples), step)]


async def _until(ws, kind: str, seen: list[dict], timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            seen.append(event)
            if event["type"] == kind:
                return event


def _session(live, **kw):
    return connect(_url(live), additional_headers={"Authorization": f"Bearer {TOKEN}"}, max_size=None, **kw)


def _run(coro):
    return asyncio.run(coro)


def _metrics(live) -> str:
    return requests.get(f"{live.base}/metrics", timeout=10).text


def test_a_spoken_question_is_heard_and_answered_in_deltas(live, speech):
    latency = "omni_realtime_speech_to_first_delta_seconds_count"
    before = metric(_metrics(live), latency)

    async def go():
        async with _session(live) as ws:
            created = json.loads(await ws.recv())
            assert created["type"] == "session.created"
            assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "instructions": "answer briefly",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}}}}))
            seen: list[dict] = []
            await _until(ws, "session.updated", seen)
            for chunk in _chunks(speech):  # four times real-time pace
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _pcm(chunk)}))
                await asyncio.sleep(CHUNK_S / 4)
            done = await _until(ws, "response.done", seen)
            return seen, done

    seen, done = _run(go())
    kinds = [e["type"] for e in seen]
    started = next(e for e in seen if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in seen if e["type"] == "input_audio_buffer.speech_stopped")
    # espeak's speech starts after the 0.6 s of silence; the start is reported less the 300 ms padding.
    assert 100 <= started["audio_start_ms"] <= 700 and stopped["audio_end_ms"] > started["audio_start_ms"] + 500
    assert started["item_id"] == stopped["item_id"]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "response.done"]
    assert [k for k in kinds if k in order] == order, kinds
    deltas = [e["delta"] for e in seen if e["type"] == "response.output_text.delta"]
    assert deltas, kinds
    assert done["response"]["status"] == "incomplete"  # the model never stops: the token budget ends it
    assert done["response"]["status_details"]["reason"] == "max_output_tokens"
    assert done["response"]["output"][0]["content"][0]["text"] == "".join(deltas)
    assert done["response"]["usage"]["output_tokens"] == 6
    assert metric(_metrics(live), latency) == before + 1  # this turn's end of speech -> its first delta


def test_metrics_count_open_sessions_events_by_type_and_errors_by_code(live):
    def read() -> dict:
        text = _metrics(live)
        return {"open": metric(text, "omni_realtime_sessions"),
                "clear": metric(text, "omni_realtime_events_total", type="input_audio_buffer.clear"),
                "unknown": metric(text, "omni_realtime_events_total", type="unknown_type"),
                "not_event": metric(text, "omni_realtime_events_total", type="not_an_event"),
                "bad_json": metric(text, "omni_realtime_errors_total", code="invalid_json"),
                "too_big": metric(text, "omni_realtime_errors_total", code="max_event_bytes")}

    before = read()

    async def go():
        async with _session(live) as ws, _session(live) as other:
            await ws.recv(), await other.recv()
            for frame in ("{not json", json.dumps({"type": "response.teleport"}),
                          json.dumps({"type": "input_audio_buffer.clear"}), "x" * 250_000):
                await ws.send(frame)
                await ws.recv()
            return await asyncio.to_thread(read)

    during = _run(go())
    assert during["open"] == before["open"] + 2
    assert [during[k] - before[k] for k in ("clear", "unknown", "not_event", "bad_json", "too_big")] == [1] * 5
    for _ in range(50):  # the server notices the closed sockets
        if read()["open"] == before["open"]:
            break
        time.sleep(0.1)
    assert read()["open"] == before["open"]


def test_a_wrong_token_is_refused(live):
    async def go(headers):
        async with connect(_url(live), additional_headers=headers):
            pass

    for headers in ({"Authorization": "Bearer nope"}, {}):
        with pytest.raises(InvalidStatus) as refused:
            _run(go(headers))
        assert refused.value.response.status_code == 401


def test_a_browser_sends_the_token_as_a_subprotocol_and_gets_realtime_back(live):
    async def go(subprotocols, headers=None):
        async with connect(_url(live), subprotocols=subprotocols, additional_headers=headers or {}) as ws:
            return ws.subprotocol, json.loads(await ws.recv())["type"]

    key = f"openai-insecure-api-key.{TOKEN}"
    assert _run(go(["realtime", key, "openai-beta.realtime-v1"])) == ("realtime", "session.created")
    wrong = "openai-insecure-api-key.nope"
    for subprotocols, headers in ((["realtime", wrong], None), (["realtime"], None),
                                  (["realtime", wrong], {"Authorization": f"Bearer {TOKEN}"})):
        with pytest.raises(InvalidStatus) as refused:
            _run(go(subprotocols, headers))
        assert refused.value.response.status_code == 401, subprotocols


def test_malformed_and_unknown_events_get_errors_and_the_session_goes_on(live):
    async def go():
        async with _session(live) as ws:
            await ws.recv()  # session.created
            replies = []
            for frame in ("{not json", json.dumps({"type": "response.teleport"}), json.dumps([1, 2]),
                          json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
                          json.dumps({"type": "session.update", "session": {"audio": {"input": {
                              "format": {"type": "audio/pcm", "rate": 3}}}}}),
                          json.dumps({"type": "response.cancel"}), b"\x00binary"):
                await ws.send(frame)
                replies.append(json.loads(await ws.recv()))
            # ...and the session still answers: a text turn gets a response.
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "what color is the shape"},
                    {"type": "input_image", "image_url": IMAGE}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            seen: list[dict] = []
            done = await _until(ws, "response.done", seen)
            return replies, seen, done

    replies, seen, done = _run(go())
    assert [r["type"] for r in replies] == ["error"] * 7
    codes = [r["error"]["code"] for r in replies]
    assert codes == ["invalid_json", "unknown_event_type", "invalid_event", "invalid_value", "invalid_value",
                     "response_cancel_not_active", "invalid_event"]
    assert "response.teleport" in replies[1]["error"]["message"]
    assert replies[4]["error"]["param"] == "session.audio.input.format.rate"
    assert "conversation.item.added" in [e["type"] for e in seen]
    assert done["response"]["status"] == "incomplete"


def test_limits_answer_with_error_events_naming_them(live):
    async def go():
        async with _session(live) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
                "turn_detection": None}}}}))
            await ws.recv()
            too_big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 250_000})
            await ws.send(too_big)
            size = json.loads(await ws.recv())
            second = _pcm(np.zeros(RATE, np.int16))  # 1 s of audio; the buffer holds 5
            for _ in range(6):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": second}))
            buffered = json.loads(await ws.recv())
            for _ in range(120):  # a burst past 80 events a second
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            seen = [json.loads(await ws.recv()) for _ in range(120)]
            return size, buffered, seen

    size, buffered, seen = _run(go())
    assert size["type"] == "error" and size["error"]["code"] == "max_event_bytes"
    assert "realtime.max_event_bytes" in size["error"]["message"]
    assert buffered["type"] == "error" and buffered["error"]["code"] == "max_buffered_audio_s"
    assert "realtime.max_buffered_audio_s" in buffered["error"]["message"]
    codes = [e["error"]["code"] for e in seen if e["type"] == "error"]
    assert codes and set(codes) == {"max_events_per_s"}
    assert "input_audio_buffer.cleared" in [e["type"] for e in seen]


def _image_item(url: str | None, text: str | None = None) -> str:
    content = ([{"type": "input_text", "text": text}] if text else []) + (
        [{"type": "input_image", "image_url": url}] if url else [])
    return json.dumps({"type": "conversation.item.create",
                       "item": {"type": "message", "role": "user", "content": content}})


def test_a_bad_image_is_refused_alone_in_the_http_routes_words_and_video_frames_are_answered(live):
    big = "data:image/png;base64," + base64.b64encode(png_bytes(64)).decode()
    not_an_image = "data:image/png;base64," + base64.b64encode(b"GIF89a but not really").decode()

    async def go():
        async with _session(live) as ws:
            await ws.recv()
            refused = []
            for url in (big, not_an_image, "https://example.com/cat.png"):
                await ws.send(_image_item(url, "look"))
                refused.append(json.loads(await ws.recv()))
            seen: list[dict] = []
            for _ in range(6):  # a camera's frames, one image item each (as OpenAI's clients send video)
                await ws.send(_image_item(IMAGE))
                await _until(ws, "conversation.item.added", seen)
            await ws.send(_image_item(None, "what moved"))
            await ws.send(json.dumps({"type": "response.create"}))
            return refused, seen, await _until(ws, "response.done", seen)

    refused, seen, done = _run(go())
    assert [r["type"] for r in refused] == ["error"] * 3
    assert [r["error"]["code"] for r in refused] == ["invalid_media", "invalid_media", "invalid_value"]
    assert {r["error"]["param"] for r in refused} == {"item.content[1].image_url"}
    assert "serving.limits.max_image_pixels" in refused[0]["error"]["message"]
    assert "was not added" in refused[1]["error"]["message"]
    # The same words as the chat completions route, for the same image, after each names its field.
    for url, error in zip((big, not_an_image), refused[:2], strict=True):
        http = requests.post(f"{live.base}/openai/v1/chat/completions", timeout=30,
                             headers={"Authorization": f"Bearer {TOKEN}"},
                             json={"model": "omni", "messages": [{"role": "user", "content": [
                                 {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]}]})
        assert http.status_code == 400, http.text
        words = http.json()["error"]["message"].removeprefix("messages[0].content[1].image_url.url")
        assert error["error"]["message"].startswith(f"item.content[1].image_url{words}; item ")
    # The session went on: the frames were added, and the question about them answered.
    assert sum(e["type"] == "conversation.item.added" for e in seen) == 7
    assert done["response"]["status"] == "incomplete" and done["response"]["usage"]["output_tokens"] == 6


def _ask_long(tokens: int = 500):
    return [json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "describe"}]}}),
        json.dumps({"type": "response.create", "response": {"max_output_tokens": tokens}})]


def test_response_cancel_stops_the_answer(live):
    async def go():
        async with _session(live) as ws:
            await ws.recv()
            for frame in _ask_long():
                await ws.send(frame)
            seen: list[dict] = []
            created = await _until(ws, "response.created", seen)
            await _until(ws, "response.output_text.delta", seen)
            await ws.send(json.dumps({"type": "response.cancel", "response_id": created["response"]["id"]}))
            return await _until(ws, "response.done", seen)

    done = _run(go())["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
    assert 1 <= done["usage"]["output_tokens"] < 500


def test_speech_during_an_answer_cancels_it_and_is_answered(live, speech):
    async def go():
        async with _session(live) as ws:
            await ws.recv()
            for frame in _ask_long():
                await ws.send(frame)
            seen: list[dict] = []
            await _until(ws, "response.output_text.delta", seen)
            for chunk in _chunks(speech):  # as fast as it goes: the answer is still running
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _pcm(chunk)}))
            first = await _until(ws, "response.done", seen)
            second = await _until(ws, "response.done", seen)
            return seen, first, second

    seen, first, second = _run(go())
    kinds = [e["type"] for e in seen]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    assert first["response"]["status"] == "cancelled"
    assert first["response"]["status_details"]["reason"] == "turn_detected"
    assert first["response"]["usage"]["output_tokens"] < 500
    # The utterance became a turn of its own and was answered in full.
    assert kinds.index("input_audio_buffer.committed") < len(kinds) - 1 - kinds[::-1].index("response.created")
    assert second["response"]["status"] == "incomplete" and second["response"]["usage"]["output_tokens"] == 6
    # The second answer's prompt resends the first turn: the engine's prefix cache supplied all of it.
    assert second["response"]["usage"]["input_token_details"]["cached_tokens"] >= first["response"]["usage"][
        "input_tokens"]


# ---------------------------------------------------------------------------------------- fuzz
_pcm_chunk = st.integers(0, 4000).map(lambda n: _pcm(np.random.default_rng(n).integers(-3000, 3000, n)))
_events = st.one_of(
    st.builds(lambda a: {"type": "input_audio_buffer.append", "audio": a}, _pcm_chunk | st.text(max_size=20)),
    st.sampled_from([{"type": "input_audio_buffer.commit"}, {"type": "input_audio_buffer.clear"},
                     {"type": "response.create", "response": {"max_output_tokens": 3}}, {"type": "response.cancel"},
                     {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}},
                     {"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 16000}}}}}]),
    st.builds(lambda t: {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                                      "content": [{"type": "input_text", "text": t}]}},
              st.text(max_size=30)),
    st.builds(lambda url: {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}},
        st.sampled_from([IMAGE, IMAGE[:60]]) | st.binary(max_size=64).map(
            lambda b: "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b).decode())),
    st.dictionaries(st.sampled_from(["type", "event_id", "audio", "session", "item", "response"]),
                    st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3)),
)
_frames = st.lists(st.one_of(_events.map(json.dumps), st.text(max_size=40), st.binary(max_size=40)), max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=_frames)
def test_fuzzed_event_sequences_never_end_the_session(live, frames):
    async def go():
        async with _session(live) as ws:
            await ws.recv()
            for frame in frames:
                await ws.send(frame)
            await ws.send(json.dumps({"type": "fuzz.ping", "event_id": "sentinel"}))
            seen: list[dict] = []
            async with asyncio.timeout(60):
                while not any(e["type"] == "error" and e["error"]["event_id"] == "sentinel" for e in seen):
                    seen.append(json.loads(await ws.recv()))
            return seen

    seen = _run(go())
    assert not [e for e in seen if e["type"] == "error" and e["error"]["code"] == "server_error"], seen
    assert "Traceback" not in live.log()


def test_sigterm_ends_each_session_with_a_close_frame_saying_why(endless):
    server = start_server(endless, endless.parent / "rt-sigterm", {"max_new_tokens": 6},
                          env={"OMNI_API_TOKEN": TOKEN})
    try:
        async def go():
            async with _session(server) as ws:
                await ws.recv()
                for frame in _ask_long():
                    await ws.send(frame)
                seen: list[dict] = []
                await _until(ws, "response.output_text.delta", seen)
                server.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    async with asyncio.timeout(30):
                        while True:
                            seen.append(json.loads(await ws.recv()))
                return seen, closed.value

        seen, closed = _run(go())
        exit_code = server.proc.wait(timeout=30)  # the process ends, well within its grace period
    finally:
        server.stop()
    # The server's own close frame, not uvicorn's bare 1012 "service restart".
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (1001, "server shutting down")
    done = next(e for e in seen if e["type"] == "response.done")["response"]
    assert done["status"] == "cancelled" and done["status_details"]["reason"] == "server_shutting_down"
    assert exit_code == 0 and "Traceback" not in server.log()


def test_a_long_voice_conversation_keeps_the_latest_turns_that_fit_and_opens_with_a_user_turn():
    from serving.protocol.realtime import conversation as conv

    items = []
    for turn in range(3):
        items += [conv.spoken(f"u{turn}", b"RIFF"), conv.answer(f"a{turn}", f"answer {turn}")]
    items.append(conv.spoken("u3", b"RIFF"))
    window = conv.to_conversation(items, "be brief", {"audio": 2, "image": 4, "video": 1})
    assert [m["role"] for m in window.messages] == ["system", "user", "assistant", "user"]
    assert window.messages[2]["content"] == "answer 2" and len(window.media) == 2


def test_a_session_past_its_length_gets_an_error_event_and_a_close_frame_saying_why(tmp_path):
    # In-process (no model needed until a response is asked for): the route on its own app.
    from serving.predictor import OmniPredictor
    from serving.protocol.realtime import routes as realtime_routes

    cfg = ServingConfig(realtime={"max_session_s": 0.3})
    predictor = OmniPredictor(cfg.model_name, tmp_path, cfg)
    predictor.ready = True
    app = FastAPI()
    app.include_router(realtime_routes.build_router(predictor, token=None))
    with TestClient(app).websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        expired = ws.receive_json()
        assert expired["type"] == "error" and expired["error"]["code"] == "max_session_s"
        assert "realtime.max_session_s" in expired["error"]["message"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1000 and "realtime.max_session_s" in closed.value.reason
