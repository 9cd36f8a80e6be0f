"""Media limits, checked once for every edge: read the header, refuse what is out of bounds, then decode.

`model.media.inputs.MediaReader` calls `read_image` / `read_video` / `read_audio` for data prep,
training, evaluation, the KServe predictor and the Triton entry model; a violation or an undecodable
item raises `MediaError` with its `kind`, which each edge maps to its own answer (a quarantine
reason in prep, a failed row in evaluation, a 400 naming the request field in serving). A
30000x30000 "image" or a ten-hour "clip" is refused from its header, before a pixel or a sample is
decoded.

`MediaLimits.source` names where the limits come from ("data", "serving.limits",
"benchmark.X.limits"), and its fields carry those sections' key names, so a message says which
setting to change: "is 5000x5000 = 25000000 pixels, over data.max_image_pixels=16777216", and
`MediaLimits.of` reads a section by those names (the one rule every edge uses).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from model.media.decode import (
    MediaError,
    Source,
    load_audio,
    load_image,
    load_video_frames,
    probe,
    probe_video_sound,
)


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on one conversation's media; the defaults bound nothing (None: no cap)."""

    source: str  # the config section the limits come from, for messages
    max_image_pixels: float = math.inf
    min_image_side: int = 1
    max_image_aspect: float = math.inf
    max_video_seconds: float = math.inf
    max_video_frames: int | None = None  # frames sampled per video, below the model's video.max_frames
    min_audio_seconds: float = 0.0
    max_audio_seconds: float = math.inf
    min_audio_sample_rate: int = 0
    max_images: int | None = None  # items per conversation
    max_videos: int | None = None
    max_audios: int | None = None

    def name(self, key: str) -> str:
        """`data.max_image_pixels=16777216`: the setting to change, with its value."""
        return f"{self.source}.{key}={getattr(self, key)}"

    @classmethod
    def of(cls, source: str, section) -> MediaLimits:
        """The limits a config section sets (a pydantic model or a dict), read by field name;
        keys the section lacks, or sets to None ("no limit"), keep their default."""
        values = section if isinstance(section, dict) else {k: getattr(section, k, None) for k in cls.keys()}
        return cls(source, **{k: values[k] for k in cls.keys() if values.get(k) is not None})

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "source"]

    def to_json(self) -> str:
        """The limits as JSON (no limit: null), e.g. to travel inside an exported model repository."""
        values = {k: None if getattr(self, k) == math.inf else getattr(self, k) for k in self.keys()}
        return json.dumps({"source": self.source, **values}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MediaLimits:
        values = json.loads(text)
        return cls.of(values.pop("source"), values)


class LimitExceeded(MediaError):
    """A decodable item outside the limits. Its message continues the item's name: "is 4.0 s, over ..."."""


@dataclass(frozen=True)
class Video:
    frames: list[Image.Image]
    times: list[float]  # seconds from the start, one per frame
    seconds: float
    audio: np.ndarray | None = None  # its sound track (mono, on the frames' clock), when asked for and present


def _check_size(width: int, height: int, limits: MediaLimits, what: str) -> None:
    if width * height > limits.max_image_pixels:
        raise LimitExceeded(f"{what} {width}x{height} = {width * height} pixels, over "
                         f"{limits.name('max_image_pixels')}", "image size")
    if min(width, height) < limits.min_image_side:
        raise LimitExceeded(f"{what} {width}x{height}, a side under {limits.name('min_image_side')}", "image size")
    if max(width, height) / min(width, height) > limits.max_image_aspect:
        raise LimitExceeded(f"{what} {width}x{height}, aspect over {limits.name('max_image_aspect')}", "image size")


def read_image(src: Source, limits: MediaLimits) -> Image.Image:
    """The image as RGB, after its header passed the size, side and aspect limits."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as head:
            width, height = head.size
    except Exception:  # noqa: BLE001 - Pillow raises many types for broken headers; load_image says why
        width = height = 0
    if width and height:
        _check_size(width, height, limits, "is")
    return _kind(load_image, "bad image", src)


def read_video(src: Source, limits: MediaLimits, fps: float, max_frames: int) -> Video:
    """Frames sampled at `fps` (at most `max_frames`), after the header passed the duration and
    frame-size limits. A container without a duration is checked on its sampled frames' times."""
    header = _kind(probe, "bad video", src, "video")
    if header.duration is not None and header.duration > limits.max_video_seconds:
        raise LimitExceeded(f"is {header.duration:.1f} s, over {limits.name('max_video_seconds')}", "video too long")
    if header.width and header.height:
        _check_size(header.width, header.height, limits, "has frames of")
    frames, times = _kind(load_video_frames, "bad video", src, fps, max_frames)
    seconds = header.duration if header.duration is not None else times[-1]
    if seconds > limits.max_video_seconds:
        raise LimitExceeded(f"is {seconds:.1f} s, over {limits.name('max_video_seconds')}", "video too long")
    return Video(frames, times, seconds)


def read_audio(src: Source, limits: MediaLimits, sampling_rate: int) -> np.ndarray:
    """Mono float32 at `sampling_rate`, after the header passed the source-rate and duration limits;
    the decoded length is checked again (a header may lack a duration, or lie)."""
    header = _kind(probe, "bad audio", src, "audio")
    if header.sample_rate < limits.min_audio_sample_rate:
        raise LimitExceeded(f"is sampled at {header.sample_rate} Hz, under {limits.name('min_audio_sample_rate')}",
                         "audio sample rate")
    if header.duration is not None and header.duration > limits.max_audio_seconds:
        raise LimitExceeded(f"is {header.duration:.1f} s, over {limits.name('max_audio_seconds')}", "audio length")
    wave = _kind(load_audio, "bad audio", src, sampling_rate)
    seconds = wave.size / sampling_rate
    if seconds > limits.max_audio_seconds:
        raise LimitExceeded(f"is {seconds:.1f} s, over {limits.name('max_audio_seconds')}", "audio length")
    if seconds < limits.min_audio_seconds:
        raise LimitExceeded(f"is {seconds:.3f} s, under {limits.name('min_audio_seconds')}", "audio length")
    return wave


def read_video_sound(src: Source, limits: MediaLimits, sampling_rate: int) -> np.ndarray | None:
    """A video's sound track as mono float32 at `sampling_rate`, sample 0 at the first frame's time;
    None when the video has no sound track. The video's limits cover its sound: its length counts
    against `max_video_seconds` (from the header, then decoded), its source rate against
    `min_audio_sample_rate`; a sound track that cannot be decoded is a "bad video audio"."""
    header = _kind(probe_video_sound, "bad video", src)
    if header is None:
        return None
    if header.sample_rate < limits.min_audio_sample_rate:
        raise LimitExceeded(f"has sound sampled at {header.sample_rate} Hz, under "
                            f"{limits.name('min_audio_sample_rate')}", "audio sample rate")
    end = (header.duration or 0.0) + header.offset
    if end > limits.max_video_seconds:
        raise LimitExceeded(f"has {end:.1f} s of sound, over {limits.name('max_video_seconds')}", "video too long")
    wave = _kind(load_audio, "bad video audio", src, sampling_rate)
    shift = round(header.offset * sampling_rate)  # sound that starts late is preceded by silence
    wave = np.concatenate([np.zeros(shift, np.float32), wave]) if shift > 0 else wave[-shift:]
    seconds = wave.size / sampling_rate
    if seconds > limits.max_video_seconds:
        raise LimitExceeded(f"has {seconds:.1f} s of sound, over {limits.name('max_video_seconds')}",
                            "video too long")
    return wave


def _kind(fn, kind: str, *args):
    """Call a decoder; its MediaError (which knows no limits) becomes one of `kind`."""
    try:
        return fn(*args)
    except MediaError as err:
        raise MediaError(str(err), err.kind or kind) from None
