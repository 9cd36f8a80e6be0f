"""A Triton model repository for a trained checkpoint.

    <repo>/vision_encoder/1/model.onnx (+ model.onnx.data)   SigLIP tower + vision projector (images)
    <repo>/video_encoder/1/model.onnx  (+ model.onnx.data)   SigLIP tower + video projector (frames)
    <repo>/audio_encoder/1/model.onnx  (+ model.onnx.data)   Whisper encoder (any length) + Conv-GMLP
    <repo>/omni/1/model.py                                    Python backend: chat processor + LLM; calls
                                                              the encoders above by BLS
    <repo>/omni/1/checkpoint/                                 config, tokenizer and the LLM's weights
    <repo>/omni/1/omni_code/model/                            the code it answers with (see BUNDLED)
    <repo>/*/config.pbtxt                                     built as ModelConfig protobufs
    <repo>/export_report.json                                 exporter, max |onnx - torch|, sizes

`encoder_backend` says what serves the encoders: "onnxruntime" (`platform: onnxruntime_onnx`, the
NGC Triton image; GPU clusters) or "python" (a Python-backend model running the same model.onnx
with onnxruntime: any Triton build, e.g. the CPU one bundled in nvidia-pytriton, which has no
onnxruntime backend). The entry model is the same either way.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from model.export.onnx import AUDIO, TOLERANCE, VIDEO, VISION, check_inputs, export_onnx, onnx_files, verify_onnx
from model.media.limits import MediaLimits
from model.nn import checkpoint as ckpt
from model.nn.omni import OmniModel

log = logging.getLogger(__name__)

ENTRY = "omni"
REPORT_FILE = "export_report.json"
TEMPLATES = Path(__file__).parent / "templates"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the `model` package
# What the entry model answers with: the network, the chat processor, media decoding and the shared
# config/runtime. Data prep, training, evaluation, export and the S3 client stay behind.
BUNDLED = ("__init__.py", "config.py", "runtime.py", "media", "text", "nn")
ENCODERS = (VISION, VIDEO, AUDIO)
ENCODER_BACKENDS = ("onnxruntime", "python")


def _relocate_onnx(src: Path, dst: Path) -> None:
    """Save `src` as `dst` with its weights in `dst.name + '.data'`: external-data files are found
    by the name recorded inside the graph, so a plain rename would break the link."""
    import onnx

    proto = onnx.load(str(src))  # pulls the external weights in
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


def _tensor_configs(values, strip_batch: bool, proto_cls) -> list:
    """ONNX graph inputs/outputs -> Triton ModelInput/ModelOutput (names, types, dims; -1 = dynamic)."""
    import onnx

    out = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        out.append(proto_cls(name=value.name, data_type=_triton_dtype(dtype), dims=dims[1:] if strip_batch else dims))
    return out


def model_config_pb2() -> ModuleType:
    """Triton's model-configuration messages (tritonclient.grpc.model_config_pb2), loaded on their own.

    Through the `tritonclient.grpc` package they come with Triton's gRPC service messages, whose
    `inference.*` names clash with kserve's in one process (protobuf refuses the second set, in either
    order); the model-configuration file alone clashes with nothing, so export, its tests and the
    KServe predictor can share a process."""
    name = "tritonclient.grpc.model_config_pb2"
    if name in sys.modules:  # the package was imported already: the same messages
        return sys.modules[name]
    if _MODEL_CONFIG not in sys.modules:
        package = importlib.util.find_spec("tritonclient").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location(_MODEL_CONFIG, Path(package) / "grpc" / "model_config_pb2.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_MODEL_CONFIG] = module
    return sys.modules[_MODEL_CONFIG]


_MODEL_CONFIG = "omni_triton_model_config_pb2"


def _triton_dtype(dtype: np.dtype) -> int:
    mc = model_config_pb2()

    table = {np.dtype(np.float32): mc.TYPE_FP32, np.dtype(np.float16): mc.TYPE_FP16, np.dtype(np.int64): mc.TYPE_INT64,
             np.dtype(np.int32): mc.TYPE_INT32, np.dtype(np.bool_): mc.TYPE_BOOL}
    return table[np.dtype(dtype)]


def _write_config(config, model_dir: Path) -> Path:
    from google.protobuf import text_format

    path = model_dir / "config.pbtxt"
    path.write_text(text_format.MessageToString(config))
    return path


def _graph_versions(onnx_path: Path) -> dict:
    """Opset and IR version: what the serving side's onnxruntime must support."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {"ir_version": proto.ir_version, "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import}}


def _onnx_config(name: str, onnx_path: Path, max_batch_size: int, backend: str = "onnxruntime"):
    import onnx
    mc = model_config_pb2()

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    batched = max_batch_size > 0  # Triton then owns the batch axis: dims list the rest
    if backend == "onnxruntime":
        config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    else:
        config = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
        config.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    config.input.extend(_tensor_configs(graph.input, batched, mc.ModelInput))
    config.output.extend(_tensor_configs(graph.output, batched, mc.ModelOutput))
    if batched:
        config.dynamic_batching.SetInParent()
    return config


def _entry_config(max_new_tokens: int, encoder_max_batch: int, limits: MediaLimits):
    mc = model_config_pb2()

    config = mc.ModelConfig(name=ENTRY, backend="python", max_batch_size=0)
    config.input.extend([
        mc.ModelInput(name="text", data_type=mc.TYPE_STRING, dims=[1]),
        *(mc.ModelInput(name=kind, data_type=mc.TYPE_STRING, dims=[-1], optional=True)
          for kind in ("image", "video", "audio")),
        mc.ModelInput(name="max_new_tokens", data_type=mc.TYPE_INT32, dims=[1], optional=True),
    ])
    config.output.append(mc.ModelOutput(name="text_output", data_type=mc.TYPE_STRING, dims=[1]))
    config.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    config.parameters["checkpoint"].string_value = "checkpoint"  # relative to omni/1/: the repo is movable
    config.parameters["max_new_tokens"].string_value = str(max_new_tokens)
    config.parameters["encoder_max_batch"].string_value = str(encoder_max_batch)
    config.parameters["media_limits"].string_value = limits.to_json()  # the endpoint's, so both refuse alike
    return config


def _link_or_copy(src: str, dst: str) -> str:
    """Checkpoints are write-once: a hard link saves a second copy of the weights where possible."""
    try:
        os.link(src, dst)
        return dst
    except OSError:
        return shutil.copy2(src, dst)


def _write_llm_checkpoint(checkpoint_dir: Path, model: OmniModel, dst: Path) -> None:
    """The entry model's checkpoint: config and tokenizer as they are, weights of the LLM only (the
    media towers are the ONNX encoder models)."""
    dst.mkdir(parents=True)
    shutil.copy2(checkpoint_dir / ckpt.CONFIG_FILE, dst / ckpt.CONFIG_FILE)
    shutil.copytree(checkpoint_dir / ckpt.TOKENIZER_DIR, dst / ckpt.TOKENIZER_DIR, copy_function=_link_or_copy)
    ckpt.save_weights({k: v for k, v in model.state_dict().items() if k.startswith("llm.")}, dst)


def _bundle_code(dst: Path) -> None:
    """Copy the part of the `model` package the entry model runs (BUNDLED, sources only), so the
    repository answers with the code its weights were trained with."""
    dst.mkdir(parents=True)
    for name in BUNDLED:
        src = PACKAGE_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)


def write_triton_repository(checkpoint_dir: str | Path, out_dir: str | Path, *, limits: MediaLimits,
                            max_batch_size: int = 8, max_new_tokens: int = 64, dynamo: bool = True,
                            encoder_backend: str = "onnxruntime") -> Path:
    """Build a Triton model repository at `out_dir` from an HF-format checkpoint and return its path.
    The entry model refuses media outside `limits` (the KServe endpoint's `serving.limits`), with the
    endpoint's words.

    Re-running replaces the models this function writes; nothing else in `out_dir` is touched.
    Raises OnnxMismatchError if an ONNX graph disagrees with torch beyond TOLERANCE."""
    if encoder_backend not in ENCODER_BACKENDS:
        raise ValueError(f"encoder_backend must be one of {ENCODER_BACKENDS}, got {encoder_backend!r}")
    checkpoint_dir, repo = Path(checkpoint_dir), Path(out_dir)
    model = OmniModel.from_pretrained(checkpoint_dir).eval()
    repo.mkdir(parents=True, exist_ok=True)
    for name in (*ENCODERS, ENTRY):
        shutil.rmtree(repo / name, ignore_errors=True)

    report: dict = {"checkpoint": str(checkpoint_dir), "tolerance": TOLERANCE, "torch": torch.__version__,
                    "models": [*ENCODERS, ENTRY], "encoder_backend": encoder_backend, "onnx": {}}
    checks = check_inputs(model)
    with tempfile.TemporaryDirectory() as staging:
        exports = export_onnx(model, staging, dynamo=dynamo)
        for name, exp in exports.items():
            onnx_path = repo / name / "1" / "model.onnx"
            _relocate_onnx(exp.path, onnx_path)
            diffs = [{"shape": list(x.shape), "max_abs_diff": verify_onnx(model, onnx_path, x)} for x in checks[name]]
            _write_config(_onnx_config(name, onnx_path, max_batch_size, encoder_backend), repo / name)
            if encoder_backend == "python":
                shutil.copy2(TEMPLATES / "onnx_model.py", onnx_path.parent / "model.py")
            entry = asdict(exp) | {"path": str(onnx_path.relative_to(repo)), "files": onnx_files(onnx_path),
                                   "checks": diffs, "max_abs_diff": max(d["max_abs_diff"] for d in diffs),
                                   **_graph_versions(onnx_path)}
            report["onnx"][name] = entry
            log.info("%s: %s exporter, %.1f s, max |onnx - torch| %.2g", name, exp.exporter, exp.seconds,
                     entry["max_abs_diff"])

    version = repo / ENTRY / "1"
    version.mkdir(parents=True)
    shutil.copy2(TEMPLATES / "omni_model.py", version / "model.py")
    _write_llm_checkpoint(checkpoint_dir, model, version / "checkpoint")
    _bundle_code(version / "omni_code" / "model")
    _write_config(_entry_config(max_new_tokens, max_batch_size, limits), repo / ENTRY)

    report["exporter"] = {name: e["exporter"] for name, e in report["onnx"].items()}
    (repo / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return repo
