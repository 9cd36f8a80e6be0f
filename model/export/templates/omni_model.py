"""Triton Python-backend model "omni": the entry point of the exported model repository.

Copied by `model.export.triton.write_triton_repository` to `<repo>/omni/1/model.py`, next to
`checkpoint/` (the config, the tokenizer and the LLM's weights only) and `omni_code/` (the part of
the `model` package that answers: chat processor, media decoding, the LLM; `model.export.triton.BUNDLED`).

The media encoders are the repository's other models, the exported ONNX graphs: `vision_encoder`,
`video_encoder`, `audio_encoder`. Inside Triton this model calls them with BLS (business logic
scripting: `pb_utils.InferenceRequest(...).exec()`), whatever backend serves them (onnxruntime on a
GPU cluster, the Python backend over onnxruntime on a CPU-only server). Outside Triton (`load` from
a test, say) it runs the same ONNX files in-process with onnxruntime. The torch media towers are
not loaded at all.

Request (one conversation turn):
    text            TYPE_STRING [1]    the user message; may hold <image>/<video>/<audio> tags
    image           TYPE_STRING [-1]   optional, encoded image files (PNG, JPEG, ...)
    video           TYPE_STRING [-1]   optional, encoded video files
    audio           TYPE_STRING [-1]   optional, encoded audio files (WAV, FLAC, MP3, ...)
    max_new_tokens  TYPE_INT32  [1]    optional, default from the config parameter
Request parameter (tritonclient's `parameters={"use_audio_in_video": true}`):
    use_audio_in_video  bool           feed every video's sound track with its frames (absent: the
                                       model's video.use_audio_in_video; not a boolean: an error)
Response:
    text_output     TYPE_STRING [1]    the greedy answer

Media without a matching tag in the text are placed before the text (images, videos, audios).
Media are checked against the KServe endpoint's limits, which the export writes into config.pbtxt
(parameter `media_limits`), by the same code (`model.media.inputs.MediaReader`): a request the
endpoint refuses is refused here with the same reason.
Requests that Triton hands over together are answered in one batched `generate` call.
Encoder calls are cut into pieces of at most the encoders' max_batch_size (`encoder_max_batch`).

`triton_python_backend_utils` exists only inside Triton's stub process, so it is imported there
and nowhere else: this file compiles and imports anywhere, and `load`/`answer` work without Triton.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BUNDLED_CODE = HERE / "omni_code"
MEDIA_KINDS = ("image", "video", "audio")


def _use_bundled_code() -> None:
    """Make `import model` find the package shipped with this repository.

    Triton appends this version directory to sys.path; it holds this file, named model.py, which
    would shadow the `model` package. Drop that entry and put the bundled copy first."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    if BUNDLED_CODE.is_dir():
        sys.path.insert(0, str(BUNDLED_CODE))


def chat_input(text: str, media: dict[str, list[bytes]], reader, use_audio_in_video=None):
    """One user turn as a ChatInput: media bytes checked and decoded by `reader` (a
    `model.media.inputs.MediaReader` under the exported limits), tags added for media the text lacks.
    The n-th item of input `image` is called "image[n]" in a refusal, as the KServe endpoint calls it.
    `use_audio_in_video` (the request parameter; None: the model's `video.use_audio_in_video`) feeds
    every video's sound track with its frames."""
    from model.media.inputs import RawMedia
    from model.media.tags import tag_missing_media

    if use_audio_in_video is not None and not isinstance(use_audio_in_video, bool):
        raise ValueError(f"use_audio_in_video: expected a boolean, got {use_audio_in_video!r}")
    content = tag_missing_media(text, {kind: len(items) for kind, items in media.items()})
    items = [RawMedia(kind, data, f"{kind}[{i}]", use_audio_in_video if kind == "video" else None)
             for kind in MEDIA_KINDS for i, data in enumerate(media.get(kind, []))]
    return reader.chat_input([{"role": "user", "content": content}], items)


class Encoders:
    """The exported encoder models: by BLS inside Triton, else with onnxruntime on the repository's files."""

    OUTPUTS = {"vision_encoder": "image_embeds", "video_encoder": "video_embeds", "audio_encoder": "audio_embeds"}

    def __init__(self, repository: Path, max_batch: int):
        self.repository, self.max_batch = repository, max(max_batch, 1)
        try:
            import triton_python_backend_utils as pb_utils
        except ImportError:  # not inside Triton's stub process
            pb_utils = None
        self.pb_utils, self.sessions = pb_utils, {}

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        pieces = [self._run(name, x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(pieces)

    def _run(self, name: str, x: np.ndarray) -> np.ndarray:
        input_name = "mel" if name == "audio_encoder" else "pixel_values"
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.pb_utils is None:
            return self._session(name).run([self.OUTPUTS[name]], {input_name: x})[0]
        pb = self.pb_utils
        request = pb.InferenceRequest(model_name=name, requested_output_names=[self.OUTPUTS[name]],
                                      inputs=[pb.Tensor(input_name, x)])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{name}: {response.error().message()}")
        return pb.get_output_tensor_by_name(response, self.OUTPUTS[name]).as_numpy()

    def _session(self, name: str):
        if name not in self.sessions:
            import onnxruntime as ort

            path = self.repository / name / "1" / "model.onnx"
            self.sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return self.sessions[name]


class EncodedModel:
    """What `OmniChat` needs of a model (`cfg`, `llm`, `embed`, `eval`, `stop_token_ids`), with the encoders
    outside."""

    def __init__(self, checkpoint: Path, encoders: Encoders):
        import torch

        from model import runtime
        from model.config import ModelConfig
        from model.nn import checkpoint as ckpt
        from model.nn.loading import TensorFiles
        from model.nn.omni import build_llm

        meta = ckpt.read_meta(checkpoint)
        self.cfg, self.media_token_ids, self.encoders = ModelConfig(**meta["model"]), meta["media_token_ids"], encoders
        self.stop_token_ids = meta.get("stop_token_ids") or []  # the checkpoint's stop set (empty: the tokenizer's)
        self.llm = build_llm(self.cfg, meta["vocab_size"])
        files = TensorFiles(checkpoint)
        weights = {k.removeprefix("llm."): v for k, v in files.read(files.keys)}
        missing, unexpected = self.llm.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight" or not self.cfg.llm.tie_word_embeddings]:
            raise ValueError(f"{checkpoint}: LLM weights do not match (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        self.llm = runtime.place(self.llm)  # the LLM on this node's GPU in bf16 when it has one
        self.torch = torch

    def input_devices(self) -> dict:
        """Token ids to the LLM's device; pixels and log-mel stay on the host, where the ONNX encoders read them."""
        from model.nn.devices import LLM_INPUTS, llm_device
        from model.nn.encoders import media_inputs

        host = self.torch.device("cpu")
        return {**dict.fromkeys(LLM_INPUTS, llm_device(self)), **dict.fromkeys(media_inputs(), host)}

    def eval(self) -> EncodedModel:
        self.llm.eval()
        return self

    def embed(self, input_ids, pixel_values=None, video_pixel_values=None, audio_mel=None, audio_frames=None):
        from model.nn.omni import splice_media

        def run(name: str, x):  # host arrays in; the features join the LLM's device in splice_media
            return self.torch.from_numpy(self.encoders(name, x.detach().cpu().numpy()))

        features = {
            "image": run("vision_encoder", pixel_values).flatten(0, 1) if pixel_values is not None else None,
            "video": run("video_encoder", video_pixel_values).flatten(0, 1) if video_pixel_values is not None else None,
            # The audio graph has no padding mask: each window goes alone, cut to its own length.
            "audio": self.torch.cat([run("audio_encoder", audio_mel[i : i + 1, :, : int(n)])[0]
                                     for i, n in enumerate(audio_frames)]) if audio_mel is not None else None,
        }
        return splice_media(self.llm.get_input_embeddings()(input_ids), input_ids, features, self.media_token_ids)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        _use_bundled_code()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        checkpoint = Path(params.get("checkpoint", "checkpoint"))
        if "media_limits" not in params:  # a repository written before the entry model checked media
            raise ValueError("config.pbtxt has no media_limits parameter; export the repository again")
        self.load(checkpoint if checkpoint.is_absolute() else HERE / checkpoint, params["media_limits"],
                  int(params.get("max_new_tokens", "64")), int(params.get("encoder_max_batch", "8")))

    def load(self, checkpoint: str | Path, media_limits: str, max_new_tokens: int = 64,
             encoder_max_batch: int = 8) -> None:
        """`media_limits`: `MediaLimits.to_json()`, as the export wrote it into config.pbtxt."""
        from model.media.inputs import MediaReader
        from model.media.limits import MediaLimits
        from model.nn.checkpoint import TOKENIZER_DIR
        from model.nn.generation import OmniChat
        from model.text.processor import OmniProcessor
        from model.text.tokenizer import load_tokenizer

        checkpoint = Path(checkpoint)
        model = EncodedModel(checkpoint, Encoders(HERE.parents[1], encoder_max_batch))
        self.chat = OmniChat(model, OmniProcessor(load_tokenizer(checkpoint / TOKENIZER_DIR), model.cfg))
        self.cfg = model.cfg
        self.media = MediaReader(model.cfg, MediaLimits.from_json(media_limits))
        self.max_new_tokens = max_new_tokens

    def answer(self, items: list[tuple[str, dict[str, list[bytes]], int | None, object]]) -> list[str | Exception]:
        """(text, media bytes by kind, max_new_tokens or None, the use_audio_in_video parameter or None)
        per request -> answer or the error. A request whose media cannot be decoded fails alone; the
        rest are batched per token budget."""
        results: list[str | Exception] = [ValueError("not answered")] * len(items)
        groups: dict[int, list[tuple[int, object]]] = {}
        for i, (text, media, budget, sound) in enumerate(items):
            try:
                turn = chat_input(text, media, self.media, sound)
                groups.setdefault(budget or self.max_new_tokens, []).append((i, turn))
            except ValueError as e:  # MediaError and bad tags are ValueErrors: the client's fault
                results[i] = e
        for budget, group in groups.items():
            try:
                texts = self.chat.generate([item for _, item in group], max_new_tokens=budget)
            except ValueError as e:  # e.g. more tags than media: fails this group, not the server
                texts = [e] * len(group)
            for (i, _), out in zip(group, texts, strict=True):
                results[i] = out
        return results

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        def strings(request, name: str) -> list[bytes]:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return [] if tensor is None else [bytes(v) for v in tensor.as_numpy().reshape(-1)]

        items = []
        for request in requests:
            text = b"".join(strings(request, "text")).decode("utf-8")
            budget = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
            # Request parameters arrive as one JSON object (tritonclient's `parameters=`).
            sound = json.loads(request.parameters() or "{}").get("use_audio_in_video")
            items.append((text, {kind: strings(request, kind) for kind in MEDIA_KINDS},
                          None if budget is None else int(budget.as_numpy().reshape(-1)[0]), sound))
        # Every per-request failure is the client's (undecodable media, tags without media): a 400,
        # where this Triton has error codes (older ones only know the generic 500).
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        responses = []
        for out in self.answer(items):
            if isinstance(out, Exception):
                error = pb_utils.TritonError(str(out)) if code is None else pb_utils.TritonError(str(out), code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                tensor = pb_utils.Tensor("text_output", np.array([out.encode("utf-8")], dtype=np.object_))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self) -> None:
        self.chat = None
