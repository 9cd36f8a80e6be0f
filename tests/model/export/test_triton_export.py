"""Export of a tiny checkpoint: ONNX graphs checked against torch at shapes the trace never saw,
every config.pbtxt parsed with Triton's own protobuf, and the Python-backend model loaded the way
Triton's stub loads it (in a fresh process) and compared with OmniChat."""

from __future__ import annotations

import base64
import io
import json
import math
import py_compile
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import json_format, text_format
from omegaconf import OmegaConf
from PIL import Image

from model.config import ModelConfig
from model.export.onnx import AUDIO, VIDEO, VISION, OnnxMismatchError, export_onnx, verify_onnx
from model.export.triton import ENTRY, REPORT_FILE, model_config_pb2, write_triton_repository
from model.media.decode import load_audio, load_image
from model.media.inputs import MediaReader, RawMedia
from model.media.limits import MediaLimits
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor
from model.text.tokenizer import train_tokenizer
from tests.model.media.sound import write_video_with_sound

torch.set_num_threads(1)
mc = model_config_pb2()  # not through tritonclient.grpc: its service messages clash with kserve's
ROOT = Path(__file__).resolve().parents[3]
# The endpoint's limits, as the export step hands them over: _png() (40x48) passes, a 60x60 image does not.
LIMITS = MediaLimits("serving.limits", max_image_pixels=2500, max_video_seconds=120.0, max_images=4)


@dataclass
class Exported:
    cfg: ModelConfig
    checkpoint: Path
    repo: Path
    seconds: float


def _tiny_model(seed: int = 0) -> tuple[OmniModel, object, ModelConfig]:
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml")))
    tok = train_tokenizer(["a red square on white", "what colour is it", "say hello to the audio"], 400)
    processor = OmniProcessor(tok, cfg)
    torch.manual_seed(seed)
    return OmniModel(cfg, len(tok), processor.placeholder_ids).eval(), tok, cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("export")
    model, tok, cfg = _tiny_model()
    checkpoint = model.save_pretrained(root / "checkpoint", tok)
    start = time.perf_counter()
    repo = write_triton_repository(checkpoint, root / "triton", limits=LIMITS)
    return Exported(cfg, checkpoint, repo, time.perf_counter() - start)


@pytest.fixture(scope="module")
def reloaded(exported) -> OmniModel:
    return OmniModel.from_pretrained(exported.checkpoint).eval()


def _report(exported: Exported) -> dict:
    return json.loads((exported.repo / REPORT_FILE).read_text())


# ------------------------------------------------------------------------------------------ ONNX


def test_report_records_exporter_diffs_and_files(exported):
    report = _report(exported)
    assert set(report["onnx"]) == {VISION, VIDEO, AUDIO}
    for name, entry in report["onnx"].items():
        assert entry["exporter"] in {"dynamo", "torchscript"}, entry.get("dynamo_error")
        assert report["exporter"][name] == entry["exporter"]
        assert 0 <= entry["max_abs_diff"] <= 1e-4
        assert entry["trace_shape"][0] == 2
        assert {c["shape"][0] for c in entry["checks"]} == {1, 3}  # batch sizes the trace never used
        version = exported.repo / name / "1"
        assert entry["files"] == {f.name: f.stat().st_size for f in version.iterdir()}
        assert set(entry["files"]) <= {"model.onnx", "model.onnx.data"} and "model.onnx" in entry["files"]
    audio_lengths = {c["shape"][2] for c in report["onnx"][AUDIO]["checks"]}
    assert len(audio_lengths - {report["onnx"][AUDIO]["trace_shape"][2]}) >= 2


@pytest.mark.parametrize("batch", [1, 4])
def test_vision_graph_matches_torch_at_other_batch_sizes(exported, reloaded, batch):
    v = exported.cfg.vision
    pixels = torch.rand(batch, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    assert verify_onnx(reloaded, exported.repo / VISION / "1" / "model.onnx", pixels) <= 1e-4


@pytest.mark.parametrize(("batch", "frames"), [(1, 64), (2, 408), (3, 203)])
def test_audio_graph_matches_torch_at_other_batches_and_lengths(exported, reloaded, batch, frames):
    mel = torch.randn(batch, exported.cfg.audio.num_mel_bins, frames, generator=torch.Generator().manual_seed(frames))
    path = exported.repo / AUDIO / "1" / "model.onnx"
    assert verify_onnx(reloaded, path, {"mel": mel}) <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"mel": mel.numpy()})[0]
    stride = exported.cfg.audio.projector_stride
    assert out.shape == (batch, ((frames - 1) // 2 + 1) // stride, exported.cfg.llm.hidden_size)


def test_graph_axes_are_symbolic(exported):
    shapes = {}
    for name in (VISION, AUDIO):
        session = ort.InferenceSession(
            str(exported.repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        shapes[name] = [session.get_inputs()[0].shape, session.get_outputs()[0].shape]
    (vision_in, vision_out), (audio_in, audio_out) = shapes[VISION], shapes[AUDIO]
    assert isinstance(vision_in[0], str) and vision_in[1:] == [3, 64, 64]
    assert (
        isinstance(audio_in[0], str) and audio_in[1] == exported.cfg.audio.num_mel_bins and isinstance(audio_in[2], str)
    )
    assert isinstance(vision_out[0], str) and vision_out[1:] == [
        exported.cfg.vision.tokens_per_tile,
        exported.cfg.llm.hidden_size,
    ]
    assert isinstance(audio_out[1], str)


def test_verify_catches_a_model_that_differs(exported):
    other, _, cfg = _tiny_model(seed=1)
    pixels = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with pytest.raises(OnnxMismatchError, match="max"):
        verify_onnx(other, exported.repo / VISION / "1" / "model.onnx", pixels)


def test_tolerance_scales_with_the_output(tmp_path):
    """Large weights (a diverged or long-trained encoder) give large activations, and float32 kernels
    that sum in another order differ in proportion: the check allows TOLERANCE per unit of scale, and a
    model that really differs still fails."""
    model, _, cfg = _tiny_model()
    with torch.no_grad():
        model.vision_projector.mlp[-1].weight.mul_(1e4)
    path = export_onnx(model, tmp_path)[VISION].path
    pixels = torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = float(model.encode("image", pixels).abs().max())
    assert scale > 100
    assert verify_onnx(model, path, pixels) <= 1e-4 * scale
    other, _, _ = _tiny_model(seed=1)
    with torch.no_grad():
        other.vision_projector.mlp[-1].weight.mul_(1e4)
    with pytest.raises(OnnxMismatchError, match="max"):
        verify_onnx(other, path, pixels)


def test_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch):
    model, _, cfg = _tiny_model()
    real_export = torch.onnx.export

    def dynamo_broken(*args, dynamo=True, **kwargs):
        if dynamo:
            Path(args[2]).with_suffix(".onnx.data").write_bytes(b"half-written")  # a failed run's leftover
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    exports = export_onnx(model, tmp_path)
    assert {e.exporter for e in exports.values()} == {"torchscript"}
    assert "simulated dynamo failure" in exports[AUDIO].dynamo_error
    assert not (tmp_path / "audio_encoder.onnx.data").exists()
    mel = torch.randn(3, cfg.audio.num_mel_bins, 120)
    assert verify_onnx(model, exports[AUDIO].path, mel) <= 1e-4
    assert verify_onnx(model, exports[VISION].path, torch.rand(3, 3, 64, 64)) <= 1e-4


# ----------------------------------------------------------------------------------------- Triton


def _config(repo: Path, name: str) -> mc.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


def test_onnx_configs_parse_and_match_the_graphs(exported):
    for name in (VISION, VIDEO, AUDIO):
        config = _config(exported.repo, name)
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
        session = ort.InferenceSession(
            str(exported.repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        for declared, actual in [(config.input, session.get_inputs()), (config.output, session.get_outputs())]:
            assert [t.name for t in declared] == [t.name for t in actual]
            for t, a in zip(declared, actual, strict=True):
                assert t.data_type == mc.TYPE_FP32 and a.type == "tensor(float)"
                assert list(t.dims) == [-1 if isinstance(d, str) else d for d in a.shape[1:]]  # batch axis is Triton's
    assert list(_config(exported.repo, VISION).input[0].dims) == [3, 64, 64]
    assert list(_config(exported.repo, AUDIO).input[0].dims) == [exported.cfg.audio.num_mel_bins, -1]


def test_entry_config_parses(exported):
    config = _config(exported.repo, ENTRY)
    assert config.name == ENTRY and config.backend == "python" and not config.platform
    inputs = {t.name: t for t in config.input}
    assert list(inputs) == ["text", "image", "video", "audio", "max_new_tokens"]
    assert not inputs["text"].optional and all(
        inputs[k].optional for k in ("image", "video", "audio", "max_new_tokens")
    )
    assert {inputs[k].data_type for k in ("text", "image", "video", "audio")} == {mc.TYPE_STRING}
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("text_output", mc.TYPE_STRING, [1])]
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert MediaLimits.from_json(config.parameters["media_limits"].string_value) == LIMITS
    checkpoint = exported.repo / ENTRY / "1" / config.parameters["checkpoint"].string_value
    assert (checkpoint / "omni_config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as weights:  # the towers are the ONNX models
        assert {k.split(".")[0] for k in weights.keys()} == {"llm"}
    bundled = exported.repo / ENTRY / "1" / "omni_code" / "model"
    assert (bundled / "nn" / "generation.py").is_file() and (bundled / "media" / "decode.py").is_file()
    # Only what answering needs: no data prep, training, evaluation, export or object-store code.
    assert not [p for p in ("data", "training", "eval", "export", "storage.py") if (bundled / p).exists()]


def test_python_model_compiles(exported):
    py_compile.compile(str(exported.repo / ENTRY / "1" / "model.py"), doraise=True)


def _png(height: int = 48, width: int = 40) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    buf = io.BytesIO()
    Image.fromarray(np.stack([x * 6, y * 5, (x + y) * 3], -1).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wav(seconds: float = 1.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * math.pi * 440 * t) * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


# Mimics Triton's Python-backend stub: version dir and model dir appended to sys.path, then
# `import <version>.model`, then initialize() with the config as JSON. This project's editable
# install is taken out of the import system first, so only the repository's bundled code can answer.
STUB = """
import base64, importlib, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import torch
torch.set_num_threads(1)
version_dir, config_json = sys.argv[1], sys.argv[2]
sys.path.append(version_dir)
sys.path.append(str(__import__("pathlib").Path(version_dir).parent))
triton_model = importlib.import_module("1.model").TritonPythonModel()
triton_model.initialize({"model_config": config_json, "model_version": "1"})
import model
items = [(t, {k: [base64.b64decode(b) for b in v] for k, v in m.items()}, *r) for t, m, *r in json.load(sys.stdin)]
answers = [a if isinstance(a, str) else "ERROR " + str(a) for a in triton_model.answer(items)]
loaded = {m: getattr(sys.modules[m], "__file__", None) for m in sorted(sys.modules) if m.split(".")[0] == "model"}
print(json.dumps({"package": model.__file__, "answers": answers, "loaded": loaded}))
"""


def test_python_model_answers_like_omnichat(exported, tmp_path):
    png, wav = _png(), _wav()
    write_video_with_sound(tmp_path / "clip.mp4", seconds=2, fps=4)
    clip = (tmp_path / "clip.mp4").read_bytes()
    requests = [
        ("what colour is it", {"image": [png]}, 6, None),  # None: no use_audio_in_video parameter
        ("<audio> say hello", {"audio": [wav]}, 6, None),
        ("<image> then <audio>", {"image": [png], "audio": [wav]}, 4, None),
        ("plain text", {}, None, None),
        ("broken picture", {"image": [b"not an image"]}, 6, None),
        ("too big", {"image": [png, _png(60, 60)]}, 6, None),
        ("<video> what is said", {"video": [clip]}, 6, True),
        ("<video> what is said", {"video": [clip]}, 6, False),
        ("<video> what is said", {"video": [clip]}, 6, "yes"),
    ]
    version = exported.repo / ENTRY / "1"
    config_json = json.dumps(json_format.MessageToDict(_config(exported.repo, ENTRY), preserving_proto_field_name=True))
    payload = [(t, {k: [base64.b64encode(b).decode() for b in v] for k, v in m.items()}, *rest)
               for t, m, *rest in requests]
    proc = subprocess.run(
        [sys.executable, "-c", STUB, str(version), config_json],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).resolve().is_relative_to(version / "omni_code")  # the bundled code ran
    bundled = version / "omni_code"
    assert all(f is None or Path(f).resolve().is_relative_to(bundled) for f in result["loaded"].values())
    assert {"model.nn.generation", "model.text.processor", "model.media.decode"} <= set(result["loaded"])

    chat = OmniChat.load(exported.checkpoint)
    image, audio = load_image(png), load_audio(wav)
    # The model batches requests that share a token budget: the first two go through together.
    expected = chat.generate(
        [
            ChatInput([{"role": "user", "content": "<image>what colour is it"}], images=[image]),
            ChatInput([{"role": "user", "content": "<audio> say hello"}], audios=[audio]),
        ],
        6,
    )
    expected += chat.generate(
        [ChatInput([{"role": "user", "content": "<image> then <audio>"}], images=[image], audios=[audio])], 4
    )
    expected += chat.generate([ChatInput([{"role": "user", "content": "plain text"}])], 64)
    assert result["answers"][:4] == expected
    assert result["answers"][4].startswith("ERROR") and "image" in result["answers"][4].lower()
    # The exported limits hold: named by the request input, as the KServe endpoint names it.
    assert result["answers"][5] == "ERROR image[1] is 60x60 = 3600 pixels, over serving.limits.max_image_pixels=2500"
    # The request parameter use_audio_in_video: the sound track heard (another prompt, another
    # answer) or not, as OmniChat answers with the video read each way; a non-boolean is refused.
    reader = MediaReader(chat.model.cfg, LIMITS)
    for answer, sound in zip(result["answers"][6:8], (True, False), strict=True):
        turn = reader.chat_input([{"role": "user", "content": "<video> what is said"}],
                                 [RawMedia("video", clip, "video[0]", sound)])
        assert answer == chat.generate([turn], 6)[0]
    assert result["answers"][6] != result["answers"][7]
    assert result["answers"][8] == "ERROR use_audio_in_video: expected a boolean, got 'yes'"
