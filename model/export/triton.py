"""Export a trained checkpoint for serving: media encoders as ONNX, and a Triton model repository.

    <repo>/vision_encoder/1/model.onnx (+ model.onnx.data)   SigLIP tower + vision projector
    <repo>/audio_encoder/1/model.onnx  (+ model.onnx.data)   Whisper encoder (any length) + Conv-GMLP
    <repo>/omni/1/model.py                                    Python backend: the whole chat model
    <repo>/omni/1/checkpoint/                                 the HF-format checkpoint it loads
    <repo>/omni/1/omni_code/model/                            the `model` package that exported it
    <repo>/*/config.pbtxt                                     built as ModelConfig protobufs
    <repo>/export_report.json                                 exporter, max |onnx - torch|, sizes

The ONNX graphs are checked against torch with onnxruntime at batch sizes and audio lengths other
than the ones the export traced, which proves the dynamic axes are real and not baked-in shapes.

The audio graph is the single-item path of `AudioEncoder` (no padding mask): every window in one
request must have the same number of mel frames. That is what Triton's dynamic batcher does anyway
(it only batches equal shapes); clips of different length go in separate requests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.modeling import OmniModel

log = logging.getLogger(__name__)

VISION, AUDIO, ENTRY = "vision_encoder", "audio_encoder", "omni"
TOLERANCE = 1e-4
REPORT_FILE = "export_report.json"
TEMPLATES = Path(__file__).parent / "triton_templates"


class OnnxMismatchError(RuntimeError):
    """onnxruntime and torch disagree by more than the tolerance (or in shape)."""


class VisionEncoderGraph(nn.Module):
    """pixel_values (batch, 3, H, W) -> image_embeds (batch, tokens, llm_dim)."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)


class AudioEncoderGraph(nn.Module):
    """mel (batch, bins, frames) -> audio_embeds (batch, frames // 2 // stride, llm_dim).

    No padding mask: all items are taken as full length (see the module docstring)."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.encoder, self.projector = model.audio_encoder, model.audio_projector

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(mel))


@dataclass
class GraphSpec:
    module: nn.Module
    input_name: str
    output_name: str
    example: torch.Tensor  # the trace input; checks use other shapes
    dynamic: dict[int, tuple[str, int, int]]  # input axis -> (name, min, max)
    output_dynamic: dict[int, str]


@dataclass
class OnnxExport:
    name: str
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    seconds: float
    input_name: str
    output_name: str
    trace_shape: list[int]
    dynamo_error: str | None = None
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes


def _graph_specs(model: OmniModel) -> dict[str, GraphSpec]:
    p = next(model.parameters())
    v, a = model.cfg.vision, model.cfg.audio
    window = 2 * a.max_source_positions  # mel frames the positional table covers
    per_token = 2 * a.projector_stride  # mel frames per audio token
    trace_frames = min(20 * per_token, window)
    return {
        VISION: GraphSpec(
            VisionEncoderGraph(model).eval(), "pixel_values", "image_embeds",
            torch.rand(2, v.num_channels, v.image_size, v.image_size, device=p.device, dtype=p.dtype) * 2 - 1,
            {0: ("batch", 1, 1024)}, {0: "batch"},
        ),
        AUDIO: GraphSpec(
            AudioEncoderGraph(model).eval(), "mel", "audio_embeds",
            torch.randn(2, a.num_mel_bins, trace_frames, device=p.device, dtype=p.dtype),
            {0: ("batch", 1, 1024), 2: ("frames", per_token, window)}, {0: "batch", 1: "tokens"},
        ),
    }


def _export_one(spec: GraphSpec, path: Path, dynamo: bool) -> str:
    if dynamo:
        dims = {axis: torch.export.Dim(name, min=lo, max=hi) for axis, (name, lo, hi) in spec.dynamic.items()}
        torch.onnx.export(spec.module, (spec.example,), str(path), dynamo=True, external_data=True,
                          input_names=[spec.input_name], output_names=[spec.output_name],
                          dynamic_shapes={spec.input_name: dims}, verbose=False)
        return "dynamo"
    axes = {spec.input_name: {axis: name for axis, (name, _, _) in spec.dynamic.items()},
            spec.output_name: spec.output_dynamic}
    with warnings.catch_warnings():  # the tracer warns about every Python int it freezes; the checks at
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # other shapes are what tell if one mattered
        torch.onnx.export(spec.module, (spec.example,), str(path), dynamo=False, input_names=[spec.input_name],
                          output_names=[spec.output_name], dynamic_axes=axes)
    return "torchscript"


def _onnx_files(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.parent.glob(path.name + "*")) if f.is_file()}


def export_onnx(model: OmniModel, out_dir: str | Path, dynamo: bool = True) -> dict[str, OnnxExport]:
    """Write `vision_encoder.onnx` and `audio_encoder.onnx` (weights possibly in `<name>.onnx.data`
    beside them: keep the pair together) to `out_dir`.

    Tries the dynamo exporter (torch.export + onnxscript) first and falls back to the TorchScript
    exporter per graph if it fails; `OnnxExport.exporter` says which one wrote the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name, spec in _graph_specs(model).items():
            path = out_dir / f"{name}.onnx"
            start, error = time.perf_counter(), None
            with torch.no_grad():
                try:
                    exporter = _export_one(spec, path, dynamo)
                except Exception as e:  # any dynamo failure: the legacy exporter is the fallback
                    if not dynamo:
                        raise
                    error = f"{type(e).__name__}: {e}"[:2000]
                    log.warning("dynamo ONNX export of %s failed (%s); using the TorchScript exporter", name, error)
                    for stale in out_dir.glob(f"{name}.onnx*"):
                        stale.unlink()
                    exporter = _export_one(spec, path, dynamo=False)
            results[name] = OnnxExport(name, path, exporter, round(time.perf_counter() - start, 3), spec.input_name,
                                       spec.output_name, list(spec.example.shape), error, _onnx_files(path))
    finally:
        model.train(was_training)
    return results


def _torch_graph(model: nn.Module, input_name: str) -> nn.Module:
    if not isinstance(model, OmniModel):
        return model
    graphs = {"pixel_values": VisionEncoderGraph, "mel": AudioEncoderGraph}
    if input_name not in graphs:
        raise ValueError(f"no OmniModel graph takes an input named {input_name!r}")
    return graphs[input_name](model)


def verify_onnx(model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor | dict[str, torch.Tensor],
                tolerance: float = TOLERANCE) -> float:
    """Run `onnx_path` in onnxruntime and `model` in torch on `inputs`; return max |difference|.

    `model` is the torch module the graph came from, or the whole OmniModel (the graph is then
    picked by its input name). Raises OnnxMismatchError on a shape mismatch or a difference above
    `tolerance`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # stay inside the caller's thread budget
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = inputs if isinstance(inputs, dict) else {names[0]: inputs}
    module = _torch_graph(model, names[0])
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(*(feeds[n] for n in names)).float().cpu().numpy()
    finally:
        module.train(was_training)
    got = session.run(None, {n: feeds[n].float().cpu().numpy() for n in names})[0]
    if got.shape != expected.shape:
        raise OnnxMismatchError(f"{onnx_path}: onnxruntime gave shape {got.shape}, torch {expected.shape}")
    diff = float(np.abs(got - expected).max()) if got.size else 0.0
    if not diff <= tolerance:  # also catches NaN
        raise OnnxMismatchError(f"{onnx_path}: max |onnx - torch| = {diff:.3g} > {tolerance:g}")
    return diff


def _check_inputs(model: OmniModel) -> dict[str, list[torch.Tensor]]:
    """Shapes the export did not trace (batch 2): batch 1 and 3, three audio lengths."""
    gen = torch.Generator().manual_seed(0)
    v, a = model.cfg.vision, model.cfg.audio
    window, per_token = 2 * a.max_source_positions, 2 * a.projector_stride
    frames = sorted({min(12 * per_token, window), min(29 * per_token, window), window})
    return {
        VISION: [torch.rand(b, v.num_channels, v.image_size, v.image_size, generator=gen) * 2 - 1 for b in (1, 3)],
        AUDIO: [torch.randn(1 + 2 * (i % 2), a.num_mel_bins, t, generator=gen) for i, t in enumerate(frames)],
    }


# --------------------------------------------------------------------------- Triton repository


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


def _triton_dtype(dtype: np.dtype) -> int:
    from tritonclient.grpc import model_config_pb2 as mc

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


def _onnx_config(name: str, onnx_path: Path, max_batch_size: int):
    # Imported here, never at module level: tritonclient.grpc's protobufs clash with kserve's.
    import onnx
    from tritonclient.grpc import model_config_pb2 as mc

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    batched = max_batch_size > 0  # Triton then owns the batch axis: dims list the rest
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    config.input.extend(_tensor_configs(graph.input, batched, mc.ModelInput))
    config.output.extend(_tensor_configs(graph.output, batched, mc.ModelOutput))
    if batched:
        config.dynamic_batching.SetInParent()
    return config


def _entry_config(max_new_tokens: int):
    from tritonclient.grpc import model_config_pb2 as mc

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
    return config


def _link_or_copy(src: str, dst: str) -> str:
    """Checkpoints are write-once: a hard link saves a second copy of the weights where possible."""
    try:
        os.link(src, dst)
        return dst
    except OSError:
        return shutil.copy2(src, dst)


def _bundle_code(dst: Path) -> None:
    """Copy this `model` package (sources only) so the repository runs the code that exported it."""
    package = Path(__file__).parent
    dst.mkdir(parents=True)
    for src in package.glob("*.py"):
        shutil.copy2(src, dst / src.name)


def write_triton_repository(checkpoint_dir: str | Path, out_dir: str | Path, max_batch_size: int = 8,
                            max_new_tokens: int = 64, dynamo: bool = True) -> Path:
    """Build a Triton model repository at `out_dir` from an HF-format checkpoint and return its path.

    Re-running replaces the models this function writes; nothing else in `out_dir` is touched.
    Raises OnnxMismatchError if an ONNX graph disagrees with torch beyond TOLERANCE."""
    checkpoint_dir, repo = Path(checkpoint_dir), Path(out_dir)
    model = OmniModel.from_pretrained(checkpoint_dir).eval()
    repo.mkdir(parents=True, exist_ok=True)
    for name in (VISION, AUDIO, ENTRY):
        shutil.rmtree(repo / name, ignore_errors=True)

    report: dict = {"checkpoint": str(checkpoint_dir), "tolerance": TOLERANCE, "torch": torch.__version__,
                    "models": [VISION, AUDIO, ENTRY], "onnx": {}}
    checks = _check_inputs(model)
    with tempfile.TemporaryDirectory() as staging:
        exports = export_onnx(model, staging, dynamo=dynamo)
        for name, exp in exports.items():
            onnx_path = repo / name / "1" / "model.onnx"
            _relocate_onnx(exp.path, onnx_path)
            diffs = [{"shape": list(x.shape), "max_abs_diff": verify_onnx(model, onnx_path, x)} for x in checks[name]]
            _write_config(_onnx_config(name, onnx_path, max_batch_size), repo / name)
            entry = asdict(exp) | {"path": str(onnx_path.relative_to(repo)), "files": _onnx_files(onnx_path),
                                   "checks": diffs, "max_abs_diff": max(d["max_abs_diff"] for d in diffs),
                                   **_graph_versions(onnx_path)}
            report["onnx"][name] = entry
            log.info("%s: %s exporter, %.1f s, max |onnx - torch| %.2g", name, exp.exporter, exp.seconds,
                     entry["max_abs_diff"])

    version = repo / ENTRY / "1"
    version.mkdir(parents=True)
    shutil.copy2(TEMPLATES / "omni_model.py", version / "model.py")
    shutil.copytree(checkpoint_dir, version / "checkpoint", copy_function=_link_or_copy)
    _bundle_code(version / "omni_code" / "model")
    _write_config(_entry_config(max_new_tokens), repo / ENTRY)

    report["exporter"] = {name: e["exporter"] for name, e in report["onnx"].items()}
    (repo / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return repo
