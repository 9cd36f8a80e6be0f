"""A real `tritonserver` (the CPU build bundled in nvidia-pytriton: Python backend only) loads the
exported repository, and tritonclient over HTTP and gRPC gets the same greedy answers as the KServe
endpoint for the same inputs. The entry model reaches the ONNX encoders by BLS; here they run as
Python-backend models over onnxruntime (`encoder_backend="python"`). The onnxruntime backend (and
GPUs) exist only in NVIDIA's Triton image on a cluster: that path is not run here.

The gRPC client runs in a subprocess: tritonclient.grpc's protobufs must not meet kserve's."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from model.export.triton import write_triton_repository
from model.media.limits import MediaLimits
from serving.config import ServingLimits
from serving.local import start_server
from serving.triton import start_tritonserver
from tests.serving.test_predictor import mp4_bytes, png_bytes, wav_bytes

REPO = Path(__file__).resolve().parents[2]
MODELS_VENV = REPO / ".cache" / "triton-venv"
MAX_NEW = 6
# One source for both servers' media limits, as in the pipeline: the endpoint's serving.limits, written
# into the repository at export. Every case below is inside them; OVER_LIMIT is not.
LIMITS = {"max_image_pixels": 48 * 48, "max_video_seconds": 3.0}
OVER_LIMIT = {
    "image": ("describe", {"image": png_bytes(49)},
              "image[0] is 49x49 = 2401 pixels, over serving.limits.max_image_pixels=2304"),
    "video": ("<video> which way", {"video": mp4_bytes(seconds=4, fps=1)},
              "video[0] is 4.0 s, over serving.limits.max_video_seconds=3.0"),
    "picture as video": ("<video> which way", {"video": png_bytes()}, "video[0]: a still png image, not a video"),
}
CASES = {
    "text": ("what color is the shape", {}),
    "image": ("describe", {"image": png_bytes()}),
    "audio": ("<audio> transcribe the audio", {"audio": wav_bytes(1.0)}),
    "video": ("<video> which way does it move", {"video": mp4_bytes()}),
    "image+audio": ("<image> then <audio>", {"image": png_bytes(40), "audio": wav_bytes(0.6)}),
}

GRPC_CLIENT = """
import base64, json, sys
import numpy as np
import tritonclient.grpc as grpc

url, cases, max_new = json.load(sys.stdin)
client = grpc.InferenceServerClient(url)
answers = {}
for name, (text, media) in cases.items():
    inputs = [grpc.InferInput("text", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    for kind, data in media.items():
        tensor = grpc.InferInput(kind, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([base64.b64decode(data)], dtype=np.object_))
        inputs.append(tensor)
    budget = grpc.InferInput("max_new_tokens", [1], "INT32")
    budget.set_data_from_numpy(np.array([max_new], dtype=np.int32))
    answers[name] = client.infer("omni", inputs + [budget]).as_numpy("text_output")[0].decode()
client.close()
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def tritonserver(checkpoint):
    limits = MediaLimits.of("serving.limits", ServingLimits(**LIMITS))
    repo = write_triton_repository(checkpoint, checkpoint.parent / "repository", limits=limits,
                                   encoder_backend="python")
    server = start_tritonserver(repo, MODELS_VENV, checkpoint.parent / "triton-run")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kserve_endpoint(checkpoint):
    server = start_server(checkpoint, checkpoint.parent / "kserve", {"default_temperature": 0.0, "limits": LIMITS})
    yield server
    server.stop()


def _http_inputs(text: str, media: dict[str, bytes], triton_budget: bool) -> list:
    inputs = []
    for name, data in [("text", text.encode()), *media.items()]:
        tensor = triton_http.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
        inputs.append(tensor)
    if triton_budget:
        budget = triton_http.InferInput("max_new_tokens", [1], "INT32")
        budget.set_data_from_numpy(np.array([MAX_NEW], dtype=np.int32))
        inputs.append(budget)
    return inputs


def _answers_over_http(url: str, triton: bool) -> dict[str, str]:
    client = triton_http.InferenceServerClient(url)
    try:
        return {name: client.infer("omni", _http_inputs(text, media, triton),
                                   parameters=None if triton else {"max_new_tokens": MAX_NEW}
                                   ).as_numpy("text_output")[0].decode()
                for name, (text, media) in CASES.items()}
    finally:
        client.close()  # before the server stops, or its shutdown waits for the keep-alive connection


def _answers_over_grpc(url: str) -> dict[str, str]:
    cases = {name: (text, {k: base64.b64encode(v).decode() for k, v in media.items()})
             for name, (text, media) in CASES.items()}
    proc = subprocess.run([sys.executable, "-c", GRPC_CLIENT], input=json.dumps([url, cases, MAX_NEW]),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tritonserver_answers_like_the_kserve_endpoint_over_http_and_grpc(tritonserver, kserve_endpoint):
    kserve = _answers_over_http(kserve_endpoint.base.removeprefix("http://"), triton=False)
    over_http = _answers_over_http(tritonserver.http_url, triton=True)
    over_grpc = _answers_over_grpc(tritonserver.grpc_url)
    print("\nanswers (KServe v2 | Triton HTTP | Triton gRPC):")
    for name in CASES:
        print(f"  {name:12s} {kserve[name]!r} | {over_http[name]!r} | {over_grpc[name]!r}")
    assert over_http == kserve and over_grpc == kserve
    assert any(kserve.values()), "every answer is empty: nothing was compared"


def test_the_entry_model_calls_the_exported_encoders(tritonserver):
    client = triton_http.InferenceServerClient(tritonserver.http_url)
    try:
        assert client.is_server_ready()
        models = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
        assert models == {"omni": "READY", "vision_encoder": "READY", "video_encoder": "READY",
                          "audio_encoder": "READY"}
        client.infer("omni", _http_inputs("describe", {"image": png_bytes()}, True))
        stats = {s["name"]: s["inference_stats"]["success"]["count"]
                 for s in client.get_inference_statistics()["model_stats"]}
        assert stats["vision_encoder"] >= 1 and stats["omni"] >= 1  # BLS: omni asked vision_encoder
        config = client.get_model_config("vision_encoder")
        assert config["backend"] == "python" and config["max_batch_size"] == 8
    finally:
        client.close()


def test_bad_media_is_a_client_error(tritonserver):
    client = triton_http.InferenceServerClient(tritonserver.http_url)
    try:
        with pytest.raises(Exception, match="(?i)image") as err:
            client.infer("omni", _http_inputs("look", {"image": b"not an image"}, True))
        assert getattr(err.value, "status", lambda: None)() in ("400", None)
    finally:
        client.close()


def _refusal(url: str, text: str, media: dict[str, bytes], triton: bool) -> tuple[str, str]:
    """(HTTP status, message) of a request the server must refuse."""
    client = triton_http.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer("omni", _http_inputs(text, media, triton),
                         parameters=None if triton else {"max_new_tokens": 2})
        return err.value.status(), err.value.message()
    finally:
        client.close()


def test_media_over_the_limits_is_refused_alike_by_triton_and_kserve(tritonserver, kserve_endpoint):
    """The Triton entry model reads the limits the export wrote and refuses with the endpoint's words."""
    print("\nrefusals (status, message):")
    for name, (text, media, reason) in OVER_LIMIT.items():
        kserve = _refusal(kserve_endpoint.base.removeprefix("http://"), text, media, triton=False)
        triton = _refusal(tritonserver.http_url, text, media, triton=True)
        print(f"  {name}\n    KServe v2: {kserve}\n    Triton:    {triton}")
        assert kserve == triton == ("400", reason)
