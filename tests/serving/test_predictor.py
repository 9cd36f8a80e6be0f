"""The real model server (KServe + the omni predictor + the OpenAI route) in a subprocess, serving a
tiny untrained checkpoint, driven over HTTP on 127.0.0.1 with requests and tritonclient.

An untrained model answers gibberish, so answers are checked for shape and type, and for agreeing
with each other (greedy decoding is deterministic), never for content."""

from __future__ import annotations

import base64
import io
import json
import math
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from serving.config import ServingConfig, resolve_storage_uri
from serving.local import start_server
from tests.model.media.sound import mp4_bytes, write_video_with_sound

# Deliberately no `serving.predictor` / `serving.server` import: they import kserve, whose protobuf
# definitions clash with tritonclient.grpc's, which other test modules may load in this process.

REPO = Path(__file__).resolve().parents[2]
MAX_IMAGES = 2
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_TOKENS = 24

# ------------------------------------------------------------------------------------- media


def png_bytes(size: int = 24) -> bytes:
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 9 % 256, y * 7 % 256, (x + y) * 5 % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.4 * np.sin(2 * math.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(tone.tobytes())
    return buf.getvalue()


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ----------------------------------------------------------------------------------- fixtures


SERVER_CONFIG = {
    "model_name": "omni",
    "max_new_tokens": 8,
    "default_temperature": 0.0,  # greedy unless a test asks otherwise: answers compare exactly
    "limits": {"max_images": MAX_IMAGES, "max_request_bytes": MAX_REQUEST_BYTES, "max_tokens": MAX_TOKENS},
}


@pytest.fixture(scope="module")
def live(checkpoint: Path):
    """`python -m serving.server` on a free port (127.0.0.1 only)."""
    try:
        server = start_server(checkpoint, checkpoint.parent, SERVER_CONFIG)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(live) -> str:
    return live.base


@pytest.fixture(scope="module")
def client(server: str):
    c = triton.InferenceServerClient(server.removeprefix("http://"))
    yield c
    c.close()  # before the server stops, or its shutdown waits for the keep-alive connection


def chat(server: str, payload: dict | str | bytes, **kw) -> requests.Response:
    url = f"{server}/openai/v1/chat/completions"
    if isinstance(payload, dict):
        return requests.post(url, json=payload, timeout=60, **kw)
    return requests.post(url, data=payload, headers={"Content-Type": "application/json"}, timeout=60, **kw)


def all_media_message() -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": data_uri("image/png", png_bytes())}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes()).decode(), "format": "wav"}},
            {"type": "video_url", "video_url": {"url": data_uri("video/mp4", mp4_bytes())}},
        ],
    }


# ------------------------------------------------------------------------------ OpenAI route


def test_chat_completion_with_every_modality(server, tokenizer):
    r = chat(server, {"model": "omni", "messages": [all_media_message()], "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "omni" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["completion_tokens"] <= 6

    # Each part became a placeholder run: the text alone is exactly that much shorter. Per the tiny
    # config: image tokens, 2 video frames (2 s at 1 fps), 1 s of audio (100 mel frames); + start/end each.
    r2 = chat(server, {"messages": [{"role": "user", "content": "describe"}], "max_tokens": 2})
    assert r2.status_code == 200, r2.text
    cfg = _tiny_config()
    per_image = cfg.vision.tokens_per_tile  # a 24x24 image is one tile
    per_frame = cfg.vision.tokens_per_frame
    times = len(tokenizer.encode("0s")) + len(tokenizer.encode("1s"))  # frame timestamps as text
    audio = 100 // 2 // cfg.audio.projector_stride
    expected = (per_image + 2) + (2 * per_frame + times + 2) + (audio + 2)
    assert usage["prompt_tokens"] - r2.json()["usage"]["prompt_tokens"] == expected


def test_a_video_heard_as_well_as_seen(server, tmp_path):
    """The part's `use_audio_in_video` feeds the video's sound: after each frame, that second's audio
    tokens in <audio_start>...<audio_end> (2 s of sound: 200 mel frames, 13 + 12 audio tokens)."""
    write_video_with_sound(tmp_path / "clip.mp4", seconds=2, loud_second=1)
    clip = data_uri("video/mp4", (tmp_path / "clip.mp4").read_bytes())

    def prompt_tokens(**switch) -> int:
        part = {"type": "video_url", "video_url": {"url": clip, **switch}}
        r = chat(server, {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    seen = prompt_tokens()  # the tiny model's default: frames only
    assert prompt_tokens(use_audio_in_video=False) == seen
    assert prompt_tokens(use_audio_in_video=True) - seen == 200 // (2 * _tiny_config().audio.projector_stride) + 2 * 2
    r = chat(server, {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": clip, "use_audio_in_video": "loud"}}]}]})
    assert r.status_code == 400 and "messages[0].content[0].video_url.use_audio_in_video" in r.text


def test_streaming_matches_the_plain_answer(server):
    payload = {"messages": [{"role": "system", "content": "be brief"}, all_media_message()], "max_tokens": 6}
    plain = chat(server, payload).json()["choices"][0]["message"]["content"]
    with chat(server, {**payload, "stream": True, "stream_options": {"include_usage": True}}, stream=True) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    deltas = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert deltas.strip() == plain


def test_models_listing(server):
    r = requests.get(f"{server}/openai/v1/models", timeout=10)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["omni"]


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BAD_REQUESTS = {
    "bad base64": (
        {"messages": [{"role": "user", "content": [_image_part("data:image/png;base64,@@@not-b64")]}]},
        400,
        "base64",
        "messages[0].content[0].image_url.url",
    ),
    "not an image": (
        {"messages": [{"role": "user", "content": [_image_part(data_uri("image/png", b"plain text"))]}]},
        400,
        "image",
        "messages[0].content[0].image_url.url",
    ),
    "picture given as a video": (
        {"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_uri("video/mp4", png_bytes())}}]}]},
        400,
        "messages[0].content[0].video_url.url: a still png image, not a video",
        "messages[0].content[0].video_url.url",
    ),
    "bad audio": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....").decode()}}
                    ],
                }
            ]
        },
        400,
        "",
        "messages[0].content[0].input_audio.data",
    ),
    "unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "image_file", "file": "x"}]}]},
        400,
        "image_file",
        "messages[0].content[0]",
    ),
    "remote image": (
        {"messages": [{"role": "user", "content": [_image_part("https://example.com/cat.png")]}]},
        400,
        "data URI",
        "messages[0].content[0].image_url.url",
    ),
    "too many images": (
        {"messages": [{"role": "user", "content": [_image_part(data_uri("image/png", png_bytes()))] * 3}]},
        400,
        f"limit is {MAX_IMAGES}",
        "messages[0].content[2].image_url.url",
    ),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-4o", "model"),
    "max_tokens over the cap": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS + 1},
        400,
        "limit",
        "max_tokens",
    ),
    "literal tag in text": (
        {"messages": [{"role": "user", "content": "look: <image>"}]},
        400,
        "<image>",
        "messages[0].content",
    ),
    "no messages": ({"messages": []}, 400, "", "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "", "messages[0].role"),
    "unsupported field": ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "", "tools"),
    "json response format": (
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
        400, "text", "response_format.type",
    ),
    "too many stops": ({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "4", "stop"),
    "temperature out of range": (
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400, "2", "temperature",
    ),
    "top_logprobs without logprobs": (
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "logprobs", "top_logprobs",
    ),
    "logit_bias not a token id": (
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"hello": 1}}, 400, "token ids", "logit_bias",
    ),
    "non-JSON body": ("{this is not json", 400, "JSON", None),
    "JSON but not an object": ("[1, 2]", 400, "object", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_a_message(server, case):
    payload, status, needle, param = BAD_REQUESTS[case]
    r = chat(server, payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and needle in err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_oversized_body_is_refused(server):
    big = {"messages": [{"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 10)}]}
    r = chat(server, big)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------- v2 protocol


def _bytes_input(name: str, items: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)
    return tensor


def test_v2_metadata_lists_the_tensors(client):
    meta = client.get_model_metadata("omni")
    assert [i["name"] for i in meta["inputs"]] == ["text", "image", "video", "audio"]
    assert all(i["datatype"] == "BYTES" for i in meta["inputs"])
    assert [o["name"] for o in meta["outputs"]] == ["text_output"]
    assert client.is_model_ready("omni")


def test_v2_infer_binary_media_batch(client):
    inputs = [
        _bytes_input("text", [b"<image>what color?", b"listen", b"hello"]),
        _bytes_input("image", [png_bytes(), b"", b""]),
        _bytes_input("audio", [b"", wav_bytes(), b""]),  # no tag in row 1: it is prepended
        _bytes_input("video", [b"", b"", mp4_bytes()]),
    ]
    result = client.infer("omni", inputs, parameters={"max_new_tokens": 4})
    out = result.as_numpy("text_output")
    assert out.shape == (3,) and all(isinstance(x, bytes) for x in out)
    [x.decode("utf-8") for x in out]


def test_v2_rows_are_answered_like_single_requests(client, server):
    """Batching left-pads; greedy answers must not depend on the batch they are in."""
    batch = client.infer(
        "omni", [_bytes_input("text", [b"hello", b"what color is the shape"])], parameters={"max_new_tokens": 5}
    ).as_numpy("text_output")
    single = client.infer(
        "omni", [_bytes_input("text", [b"what color is the shape"])], parameters={"max_new_tokens": 5}
    ).as_numpy("text_output")
    assert batch[1] == single[0]
    via_openai = chat(server, {"messages": [{"role": "user", "content": "what color is the shape"}], "max_tokens": 5})
    assert via_openai.json()["choices"][0]["message"]["content"].encode() == single[0]


def test_v2_json_mode_and_base64_media(client):
    inputs = [
        _bytes_input("text", [b"<image>hi"], binary=False),
        _bytes_input("image", [base64.b64encode(png_bytes())], binary=False),
    ]
    outputs = [triton.InferRequestedOutput("text_output", binary_data=False)]
    result = client.infer("omni", inputs, outputs=outputs, parameters={"max_new_tokens": 3})
    assert result.as_numpy("text_output").shape == (1,)
    assert result.get_response()["outputs"][0]["datatype"] == "BYTES"


@pytest.mark.parametrize(
    "inputs, needle",
    [
        ([_bytes_input("text", [b"<image>x"]), _bytes_input("image", [b"\x89PNG broken"])], "image[0]"),
        ([_bytes_input("text", [b"x"]), _bytes_input("picture", [b"y"])], "picture"),
        ([_bytes_input("text", [b"a", b"b"]), _bytes_input("image", [png_bytes()])], "one per row"),
        ([_bytes_input("text", [b"<image><image>x"]), _bytes_input("image", [png_bytes()])], "2 <image> tag"),
        ([_bytes_input("text", [b"\xff\xfe"])], "UTF-8"),
        ([_bytes_input("image", [png_bytes()])], "missing input 'text'"),
    ],
    ids=["undecodable image", "unknown input", "row mismatch", "too many tags", "bad utf-8", "no text"],
)
def test_v2_bad_input_is_a_400(client, inputs, needle):
    with pytest.raises(InferenceServerException) as err:
        client.infer("omni", inputs)
    assert err.value.status() == "400" and needle in err.value.message()


def test_v2_use_audio_in_video_parameter(client, server, tmp_path):
    """The request parameter sets every video's sound switch (answers as the OpenAI route's per-part
    switch gives); absent leaves the model's default; a non-boolean is a 400 naming it."""
    from serving.protocol.v2 import rows, use_audio_in_video

    columns = {"text": [b"a", b"b"], "video": [mp4_bytes(), b""]}
    for given, want in [({}, None), ({"use_audio_in_video": True}, True), ({"use_audio_in_video": False}, False)]:
        convs = rows(columns, 4, use_audio_in_video(given))
        assert [m.use_audio_in_video for m in convs[0].media] == [want] and convs[1].media == []
    write_video_with_sound(tmp_path / "clip.mp4", seconds=2, loud_second=1)
    clip = (tmp_path / "clip.mp4").read_bytes()
    inputs = [_bytes_input("text", [b"x"]), _bytes_input("video", [clip])]

    def answers(sound: bool) -> tuple[bytes, bytes]:
        v2 = client.infer("omni", inputs, parameters={"max_new_tokens": 6, "use_audio_in_video": sound})
        part = {"type": "video_url", "video_url": {"url": data_uri("video/mp4", clip), "use_audio_in_video": sound}}
        r = chat(server, {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "x"}]}],
                          "max_tokens": 6})
        return v2.as_numpy("text_output")[0], r.json()["choices"][0]["message"]["content"].encode()

    heard, seen = answers(True), answers(False)
    assert heard[0] == heard[1] and seen[0] == seen[1]  # v2 reads the sound exactly as the OpenAI route
    assert heard[0] != seen[0]  # (the tiny model answers otherwise once it hears the track)
    with pytest.raises(InferenceServerException) as err:
        client.infer("omni", inputs, parameters={"use_audio_in_video": "yes"})
    assert err.value.status() == "400" and "use_audio_in_video" in err.value.message()


def test_v2_too_many_tokens_is_a_400(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("omni", [_bytes_input("text", [b"x"])], parameters={"max_new_tokens": MAX_TOKENS + 1})
    assert err.value.status() == "400" and "max_new_tokens" in err.value.message()


def test_v1_predict(server):
    payload = {
        "instances": [{"text": "hi", "image": base64.b64encode(png_bytes()).decode()}],
        "parameters": {"max_new_tokens": 3},
    }
    r = requests.post(f"{server}/v1/models/omni:predict", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1
    r = requests.post(f"{server}/v1/models/omni:predict", json={"instances": [{"txt": "hi"}]}, timeout=60)
    assert r.status_code == 400 and "txt" in r.json()["error"]


def test_a_repeated_question_reports_the_prompt_tokens_it_reused(server):
    """The engine's prefix cache (model.nn.prefix_cache) through the route: OpenAI's
    usage.prompt_tokens_details.cached_tokens, and the Prometheus counters."""
    def hits() -> float:
        text = requests.get(f"{server}/metrics", timeout=10).text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("omni_prefix_cache_hit_tokens_total")))

    question = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri("image/png", png_bytes(30))}},
        {"type": "text", "text": "what is this, asked twice"}]}], "max_tokens": 4, "temperature": 0}
    first = chat(server, question).json()
    before = hits()
    again = chat(server, question).json()
    prompt = again["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < prompt - 1
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt - 1
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert hits() - before == prompt - 1


def test_metrics_endpoint(server):
    chat(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    r = requests.get(f"{server}/metrics", timeout=10)
    assert r.status_code == 200
    assert 'request_predict_seconds_count{model_name="omni"}' in r.text


# ------------------------------------------------------------------- raw v2 bodies and startup


def _raw_v2(server: str, header: dict, tail: bytes = b"", declared: int | None = None) -> requests.Response:
    head = json.dumps(header).encode()
    hdrs = {
        "Inference-Header-Content-Length": str(len(head) if declared is None else declared),
        "Content-Type": "application/octet-stream",
    }
    return requests.post(f"{server}/v2/models/omni/infer", data=head + tail, headers=hdrs, timeout=60)


def test_v2_malformed_binary_bodies_are_400(server):
    spec = {"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}
    ok = _raw_v2(server, {"inputs": [spec], "parameters": {"max_new_tokens": 2}}, (5).to_bytes(4, "little") + b"hello")
    assert ok.status_code == 200, ok.text
    cases = {
        "tensor cut short": _raw_v2(server, {"inputs": [spec]}, (5).to_bytes(4, "little") + b"hel"),
        "element past the end": _raw_v2(server, {"inputs": [spec]}, (50).to_bytes(4, "little") + b"hello"),
        "header length lies": _raw_v2(server, {"inputs": [spec]}, b"", declared=10**6),
        "header not JSON": requests.post(
            f"{server}/v2/models/omni/infer",
            data=b"\x00garbage",
            headers={"Inference-Header-Content-Length": "8"},
            timeout=60,
        ),
        "no inputs": _raw_v2(server, {"outputs": []}),
    }
    for name, r in cases.items():
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["error"], name


def test_v2_json_without_content_type(server):
    """tritonclient-style JSON with no Content-Type header (KServe alone refuses it)."""
    body = {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
        "parameters": {"max_new_tokens": 2},
    }
    r = requests.post(f"{server}/v2/models/omni/infer", data=json.dumps(body), timeout=60)
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    assert out["name"] == "text_output" and out["shape"] == [1] and isinstance(out["data"][0], str)
    with_header = requests.post(f"{server}/v2/models/omni/infer", json=body, timeout=60)
    assert with_header.status_code == 200 and with_header.json()["outputs"][0]["data"] == out["data"]


def test_concurrent_requests_share_the_model_safely(server):
    """Parallel clients, plain and streamed, share the engine's batch and all get the same greedy answer."""
    prompt = {"messages": [{"role": "user", "content": "what color is the shape"}], "max_tokens": 6}

    def plain(_):
        return chat(server, prompt).json()["choices"][0]["message"]["content"]

    def streamed(_):
        with chat(server, {**prompt, "stream": True}, stream=True) as r:
            lines = [ln.removeprefix("data: ") for ln in r.iter_lines(decode_unicode=True) if ln]
        chunks = [json.loads(x) for x in lines[:-1]]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda i: (plain if i % 2 else streamed)(i), range(6)))
    assert len(set(answers)) == 1, answers


def test_storage_uri_schemes(checkpoint):
    assert resolve_storage_uri(checkpoint) == checkpoint
    assert resolve_storage_uri(f"file://{checkpoint}") == checkpoint
    with pytest.raises(ValueError, match="s3:// is not supported"):
        resolve_storage_uri("s3://models/omni")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_storage_uri(checkpoint / "missing")


def test_serving_config_is_strict(tmp_path):
    assert ServingConfig().limits.max_images > 0
    with pytest.raises(ValueError, match="max_imagez"):
        ServingConfig(limits={"max_imagez": 3})
    with pytest.raises(ValueError, match="exceeds limits.max_tokens"):
        ServingConfig(max_new_tokens=100, limits={"max_tokens": 50})
    path = tmp_path / "serving.yaml"
    path.write_text("model_name: m\nlimits: {max_images: 1}\n")
    assert ServingConfig.from_yaml(path).limits.max_images == 1


def _tiny_config():
    from omegaconf import OmegaConf

    from model.config import ModelConfig

    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")))
