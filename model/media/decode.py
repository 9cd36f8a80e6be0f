"""Decode and normalise media: images -> RGB, videos -> RGB frames sampled at a fixed rate,
audio -> 16 kHz mono float32.

Only Pillow, PyAV and numpy: the same code runs in data prep, training, evaluation and serving,
so it avoids torchvision/torchaudio (heavy, and tied to the torch build).

Every decoding failure is raised as `MediaError` with a reason, so data prep can quarantine the
record ("truncated image", "no audio stream", ...) instead of crashing or silently dropping it.
"""

from __future__ import annotations

import bisect
import io
import math
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Source = str | Path | bytes


class MediaError(ValueError):
    """A media item that cannot be decoded (empty, truncated, wrong format, no usable stream) or
    that breaks a limit (`model.media.limits`). `kind` names the class of problem ("bad image",
    "image size", "video too long", ...): data prep quarantines under it, the predictor answers 400.
    `item` is the name the caller gave the item (`model.media.inputs.RawMedia.name`), once known."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.item: str | None = None


def describe(src: Source) -> str:
    """How messages name a source: its path, or its size for bytes."""
    return f"<{len(src)} bytes>" if isinstance(src, bytes) else str(src)


def _check_source(src: Source) -> str | io.BytesIO:
    """Reject missing and zero-byte inputs up front: decoders give confusing errors for them."""
    if isinstance(src, bytes):
        if not src:
            raise MediaError("empty input (0 bytes)")
        return io.BytesIO(src)
    path = Path(src)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    return str(path)


# ---------------------------------------------------------------------------------------- images


def load_image(src: Source) -> Image.Image:
    """Decode an image fully and return it as RGB (EXIF rotation applied, alpha put on white)."""
    handle = _check_source(src)
    try:
        with Image.open(handle) as img:
            # `open` only reads the header; `load` decodes every pixel, so truncated files fail here.
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        raise MediaError(f"{describe(src)}: not a recognised image format") from e
    except Image.DecompressionBombError as e:
        raise MediaError(f"{describe(src)}: image too large ({e})", "image size") from e
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated") or SyntaxError.
        raise MediaError(f"{describe(src)}: corrupt or truncated image ({e})") from e


# ---------------------------------------------------------------------------------------- videos


def _open(src: Source) -> av.container.InputContainer:
    handle = _check_source(src)
    try:
        return av.open(handle, mode="r")
    except av.FFmpegError as e:
        raise MediaError(f"{describe(src)}: cannot open container ({e})") from e


def _is_still_image(container: av.container.InputContainer) -> bool:
    """ffmpeg opens pictures with its image demuxers: `image2` (files) and one `<codec>_pipe` per
    image format (png_pipe, jpeg_pipe, ...). No video container opens with them, so a picture given
    as a video (a PNG named clip.mp4) is recognised here, whatever its name says."""
    name = container.format.name
    return name in ("image2", "image2pipe") or name.endswith("_pipe")


def _video_stream(container: av.container.InputContainer, src: Source) -> av.stream.Stream:
    """The first video stream of a real video: a still image or a file without video is refused."""
    streams = container.streams.video
    if not streams:
        raise MediaError(f"{describe(src)}: no video stream")
    if _is_still_image(container):
        raise MediaError(f"{describe(src)}: a still {streams[0].codec_context.name} image, not a video")
    return streams[0]


def _stream_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """Target times: one every 1/fps seconds; if that is more than `max_frames`, `max_frames`
    times spread evenly over the whole duration instead (so long videos are covered end to end)."""
    if fps <= 0 or max_frames <= 0:
        raise ValueError("fps and max_frames must be positive")
    n = max(1, math.ceil(duration * fps - 1e-9))
    if n <= max_frames:
        return [i / fps for i in range(n)]
    return [i * duration / max_frames for i in range(max_frames)]


def load_video_frames(
    src: Source, fps: float = 1.0, max_frames: int = 48
) -> tuple[list[Image.Image], list[float]]:
    """Sample RGB frames at `fps` (at most `max_frames`), plus their times in seconds.

    Each target gets the first frame at or after it. A target is reached by seeking to the keyframe
    before it when a keyframe lies between the decoder's position and the target, otherwise by
    decoding forward: a long video costs about one GOP per sample, not a full decode, and samples
    denser than the keyframes (1 fps with 10 s GOPs) cost one pass, not one GOP each.
    Timestamps are the sampled frames' own presentation times, relative to the stream start.
    """
    container = _open(src)
    try:
        stream = _video_stream(container, src)
        stream.thread_type = "AUTO"
        tb = stream.time_base
        start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        duration = _stream_duration(container, stream)
        frames: list[Image.Image] = []
        times: list[float] = []
        try:
            if duration is None or tb is None:
                # No duration to plan seeks with (rare, e.g. raw streams): one sequential pass instead.
                frames, times = _sample_sequential(container, stream, fps, max_frames, start)
            else:
                targets = [start + t for t in sample_times(duration, fps, max_frames)]
                for frame in _frames_at(container, stream, targets):
                    if frame is not None:
                        frames.append(frame.to_image())
                        times.append(float(frame.time) - start)
        except av.FFmpegError as e:
            raise MediaError(f"{describe(src)}: corrupt video ({e})") from e
        if not frames:
            raise MediaError(f"{describe(src)}: no decodable video frames")
        return frames, times
    finally:
        container.close()


def _keyframe_times(container: av.container.InputContainer, stream: av.stream.Stream) -> list[float]:
    """Presentation times of the keyframes, sorted, from the packets alone (demuxing reads the
    file but decodes nothing)."""
    keys = [float(p.pts * stream.time_base) for p in container.demux(stream) if p.is_keyframe and p.pts is not None]
    return sorted(keys)


def _frames_at(
    container: av.container.InputContainer, stream: av.stream.Stream, targets: list[float]
) -> Iterator[av.VideoFrame | None]:
    """For each (increasing) target, the first frame at or after it, or the last frame if the
    target is past the final one. Seeks only when a keyframe lies in (position, target]: decoding
    forward from the current position would then cost more than restarting at that keyframe."""
    keys = _keyframe_times(container, stream)
    decoder: Iterator[av.VideoFrame] | None = None
    current: av.VideoFrame | None = None  # the last decoded frame: it may serve the next target too
    for t in targets:
        # Half a microsecond of slack: targets like 1/3 s never land exactly on a pts.
        if current is not None and current.time >= t - 5e-7:
            yield current
            continue
        position = current.time if current is not None else -math.inf
        if decoder is None or bisect.bisect_right(keys, t + 5e-7) > bisect.bisect_right(keys, position):
            container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
            decoder = container.decode(stream)
        for frame in decoder:
            if frame.time is None:
                continue
            current = frame
            if frame.time >= t - 5e-7:
                break
        yield current


def _sample_sequential(
    container: av.container.InputContainer,
    stream: av.stream.Stream,
    fps: float,
    max_frames: int,
    start: float,
) -> tuple[list[Image.Image], list[float]]:
    frames: list[Image.Image] = []
    times: list[float] = []
    next_t = 0.0
    for frame in container.decode(stream):
        if frame.time is None or len(frames) >= max_frames:
            continue
        t = float(frame.time) - start
        if t >= next_t - 5e-7:
            frames.append(frame.to_image())
            times.append(t)
            next_t += 1.0 / fps
    return frames, times


# ----------------------------------------------------------------------------------------- audio


def load_audio(src: Source, sampling_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream to mono float32 in [-1, 1] at `sampling_rate` Hz."""
    container = _open(src)
    try:
        if not container.streams.audio:
            raise MediaError(f"{describe(src)}: no audio stream")
        stream = container.streams.audio[0]
        # Packed float mono output: one contiguous array per frame, no per-format scaling needed.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush the resampler's buffered tail
                chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as e:
            raise MediaError(f"{describe(src)}: corrupt audio ({e})") from e
    finally:
        container.close()
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise MediaError(f"{describe(src)}: audio stream has no samples")
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    return np.clip(wave, -1.0, 1.0)


@dataclass(frozen=True)
class Header:
    """What a container says about its first stream before anything is decoded."""

    duration: float | None  # seconds; None when the container does not say
    width: int = 0  # video
    height: int = 0
    sample_rate: int = 0  # audio, of the source (before resampling)
    offset: float = 0.0  # a video's sound: seconds from the video's first frame to the sound's start


def probe(src: Source, kind: str) -> Header:
    """Header facts of the first `kind` ("video" or "audio") stream; decodes nothing."""
    container = _open(src)
    try:
        if kind == "video":
            stream = _video_stream(container, src)
            ctx = stream.codec_context
            return Header(_stream_duration(container, stream), width=ctx.width or 0, height=ctx.height or 0)
        if not container.streams.audio:
            raise MediaError(f"{describe(src)}: no audio stream")
        stream = container.streams.audio[0]
        return Header(_stream_duration(container, stream), sample_rate=stream.sample_rate or 0)
    finally:
        container.close()


def probe_video_sound(src: Source) -> Header | None:
    """The sound track of a video (its first audio stream), or None when it has none; decodes nothing.
    `Header.offset` is where the sound starts on the video's clock (frame times count from the video
    stream's start), so a muxer's delay between the streams does not shift words against frames."""
    container = _open(src)
    try:
        video = _video_stream(container, src)
        if not container.streams.audio:
            return None
        audio = container.streams.audio[0]

        def start(stream: av.stream.Stream) -> float:
            return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

        return Header(_stream_duration(container, audio), sample_rate=audio.sample_rate or 0,
                      offset=start(audio) - start(video))
    finally:
        container.close()


def media_duration(src: Source) -> float:
    """Duration in seconds of an audio or video file, from the container header (no decoding)."""
    container = _open(src)
    try:
        streams = list(container.streams.video) + list(container.streams.audio)
        if not streams:
            raise MediaError(f"{describe(src)}: no audio or video stream")
        duration = _stream_duration(container, streams[0])
        if duration is None:
            raise MediaError(f"{describe(src)}: duration unknown")
        return duration
    finally:
        container.close()


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """Mono 16-bit PCM WAV of `samples`: int16 as they are, floats in [-1, 1] scaled (clipped)."""
    pcm = samples if samples.dtype == np.int16 else (np.clip(samples, -1, 1) * 32767).round()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def sound_as_pcm16(src: Source, rate: int) -> np.ndarray:
    """The first audio stream of a file (a WAV of any rate, sample format and channel count, or a
    video's sound track) as mono int16 at `rate`: what a client streams to a realtime endpoint,
    which reads it with its own media reader. Not model input: that goes through `MediaReader`."""
    return (load_audio(src, rate) * 32767).round().astype(np.int16)
