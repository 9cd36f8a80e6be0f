"""Triton Python-backend model "omni": the entry point of the exported model repository.

Copied by `model.export.triton.write_triton_repository` to `<repo>/omni/1/model.py`, next to
`checkpoint/` (the HF-format checkpoint) and `omni_code/` (the part of the `model` package that answers:
network, chat processor, media decoding; `model.export.triton.BUNDLED`).

Request (one conversation turn):
    text            TYPE_STRING [1]    the user message; may hold <image>/<video>/<audio> tags
    image           TYPE_STRING [-1]   optional, encoded image files (PNG, JPEG, ...)
    video           TYPE_STRING [-1]   optional, encoded video files
    audio           TYPE_STRING [-1]   optional, encoded audio files (WAV, FLAC, MP3, ...)
    max_new_tokens  TYPE_INT32  [1]    optional, default from the config parameter
Response:
    text_output     TYPE_STRING [1]    the greedy answer

Media without a matching tag in the text are placed before the text (images, videos, audios).
Requests that Triton hands over together are answered in one batched `generate` call.

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


def chat_input(text: str, media: dict[str, list[bytes]], cfg):
    """One user turn as a ChatInput: media bytes decoded, tags added for media the text lacks."""
    from model.media.decode import load_audio, load_image, load_video_frames
    from model.media.tags import tag_missing_media
    from model.text.processor import ChatInput

    content = tag_missing_media(text, {kind: len(items) for kind, items in media.items()})
    images = [load_image(b) for b in media.get("image", [])]
    sampled = [load_video_frames(b, cfg.video.fps, cfg.video.max_frames) for b in media.get("video", [])]
    audios = [load_audio(b, cfg.audio.sampling_rate) for b in media.get("audio", [])]
    return ChatInput(messages=[{"role": "user", "content": content}], images=images,
                     videos=[frames for frames, _ in sampled], video_times=[times for _, times in sampled],
                     audios=audios)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        _use_bundled_code()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        checkpoint = Path(params.get("checkpoint", "checkpoint"))
        self.load(checkpoint if checkpoint.is_absolute() else HERE / checkpoint,
                  int(params.get("max_new_tokens", "64")))

    def load(self, checkpoint: str | Path, max_new_tokens: int = 64) -> None:
        from model.nn.generation import OmniChat

        self.chat = OmniChat.load(checkpoint)
        self.cfg = self.chat.model.cfg
        self.max_new_tokens = max_new_tokens

    def answer(self, items: list[tuple[str, dict[str, list[bytes]], int | None]]) -> list[str | Exception]:
        """(text, media bytes by kind, max_new_tokens or None) per request -> answer or the error.

        A request whose media cannot be decoded fails alone; the rest are batched per token budget."""
        results: list[str | Exception] = [ValueError("not answered")] * len(items)
        groups: dict[int, list[tuple[int, object]]] = {}
        for i, (text, media, budget) in enumerate(items):
            try:
                groups.setdefault(budget or self.max_new_tokens, []).append((i, chat_input(text, media, self.cfg)))
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
            items.append((text, {kind: strings(request, kind) for kind in MEDIA_KINDS},
                          None if budget is None else int(budget.as_numpy().reshape(-1)[0])))
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
