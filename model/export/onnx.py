"""The media encoders as ONNX graphs: SigLIP tower + vision projector (images), SigLIP tower + video
projector (video frames), Whisper encoder + Conv-GMLP (audio).

The ONNX graphs are checked against torch with onnxruntime at batch sizes and audio lengths other
than the ones the export traced, which proves the dynamic axes are real and not baked-in shapes.

The audio graph is the single-item path of `AudioEncoder` (no padding mask): every window in one
request must have the same number of mel frames. That is what Triton's dynamic batcher does anyway
(it only batches equal shapes); clips of different length go in separate requests.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.nn.omni import OmniModel

log = logging.getLogger(__name__)

VISION, VIDEO, AUDIO = "vision_encoder", "video_encoder", "audio_encoder"
# Allowed |onnx - torch| per unit of the output's scale. float32 kernels that sum in another order
# differ in proportion to the activations they pass through, and a diverged or long-trained encoder
# carries large ones inside: a diverged demo SFT measured 4.6e-4 of its output's scale through the
# SigLIP tower. A graph that really differs is off by the order of the scale itself.
TOLERANCE = 1e-3


class OnnxMismatchError(RuntimeError):
    """onnxruntime and torch disagree by more than the tolerance (or in shape)."""


class VisionEncoderGraph(nn.Module):
    """pixel_values (batch, 3, H, W) -> image_embeds (batch, tokens, llm_dim)."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode("image", pixel_values)


class VideoEncoderGraph(nn.Module):
    """pixel_values (frames, 3, H, W) -> video_embeds (frames, tokens_per_frame, llm_dim)."""

    def __init__(self, model: OmniModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode("video", pixel_values)


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
        VIDEO: GraphSpec(
            VideoEncoderGraph(model).eval(), "pixel_values", "video_embeds",
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


def onnx_files(path: Path) -> dict[str, int]:
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
                                       spec.output_name, list(spec.example.shape), error, onnx_files(path))
    finally:
        model.train(was_training)
    return results


def _torch_graph(model: nn.Module, output_name: str) -> nn.Module:
    if not isinstance(model, OmniModel):
        return model
    graphs = {"image_embeds": VisionEncoderGraph, "video_embeds": VideoEncoderGraph, "audio_embeds": AudioEncoderGraph}
    if output_name not in graphs:
        raise ValueError(f"no OmniModel graph has an output named {output_name!r}")
    return graphs[output_name](model)


def verify_onnx(model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor | dict[str, torch.Tensor],
                tolerance: float = TOLERANCE) -> float:
    """Run `onnx_path` in onnxruntime and `model` in torch on `inputs`; return max |difference|.

    `model` is the torch module the graph came from, or the whole OmniModel (the graph is then
    picked by its output name). Raises OnnxMismatchError on a shape mismatch or a difference above
    `tolerance` times the output's scale (its largest magnitude, at least 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # stay inside the caller's thread budget
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = inputs if isinstance(inputs, dict) else {names[0]: inputs}
    module = _torch_graph(model, session.get_outputs()[0].name)
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
    # Relative to the output's scale once it exceeds 1: float32 kernels that sum in a different order
    # differ in proportion to the magnitudes (after an SFT at lr 0.5 the vision encoder differed by 2e-3).
    allowed = tolerance * max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    if not diff <= allowed:  # also catches NaN
        raise OnnxMismatchError(f"{onnx_path}: max |onnx - torch| = {diff:.3g} > {allowed:.3g} "
                                f"(tolerance {tolerance:g} x max(1, max |torch|))")
    return diff


def check_inputs(model: OmniModel) -> dict[str, list[torch.Tensor]]:
    """Shapes the export did not trace (batch 2): batch 1 and 3, three audio lengths."""
    gen = torch.Generator().manual_seed(0)
    v, a = model.cfg.vision, model.cfg.audio
    window, per_token = 2 * a.max_source_positions, 2 * a.projector_stride
    frames = sorted({min(12 * per_token, window), min(29 * per_token, window), window})
    return {
        VISION: [torch.rand(b, v.num_channels, v.image_size, v.image_size, generator=gen) * 2 - 1 for b in (1, 3)],
        VIDEO: [torch.rand(b, v.num_channels, v.image_size, v.image_size, generator=gen) * 2 - 1 for b in (1, 3)],
        AUDIO: [torch.randn(1 + 2 * (i % 2), a.num_mel_bins, t, generator=gen) for i, t in enumerate(frames)],
    }
