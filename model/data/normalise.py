"""A record's media, fetched, checked against the data limits and normalised into content-addressed
files: images as RGB PNG, audio as 16 kHz mono WAV, videos kept as uploaded (re-encoding is lossy,
and fps / max_frames are model settings a later stage may change; training samples frames by
seeking, which costs about one GOP per frame)."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import DataConfig, ModelConfig
from model.data.inputs import fetch_media
from model.data.quarantine import Rejected, media_message
from model.data.records import Record
from model.data.shards import sha256
from model.media.decode import MediaError
from model.media.limits import LimitExceeded, MediaLimits, read_audio, read_image, read_video
from model.storage import StorageError

STATS = ("image_pixels", "video_seconds", "video_frames", "audio_seconds")


def data_limits(data: DataConfig) -> MediaLimits:
    return MediaLimits(
        source="data", max_image_pixels=data.max_image_pixels, min_image_side=data.min_image_side,
        max_image_aspect=data.max_image_aspect, max_video_seconds=data.max_video_seconds,
        min_audio_seconds=data.min_audio_seconds, max_audio_seconds=data.max_audio_seconds,
        min_audio_sample_rate=data.min_audio_sample_rate)


@dataclass
class NormalisedMedia:
    refs: dict[str, list[str]] = field(default_factory=lambda: {"image": [], "video": [], "audio": []})
    hashes: list[str] = field(default_factory=list)  # content hashes in tag order
    stats: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in STATS})


def wav_bytes(wave_f32: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(wave_f32, -1, 1) * 32767).round().astype("<i2").tobytes())
    return buf.getvalue()


def _normalise(kind: str, blob: bytes, data: DataConfig, model: ModelConfig, stats: dict) -> tuple[bytes, str]:
    """(normalised bytes, extension) of one item; raises MediaError with the problem's kind."""
    limits = data_limits(data)
    if kind == "image":
        img = read_image(blob, limits)
        stats["image_pixels"].append(img.width * img.height)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    if kind == "video":
        video = read_video(blob, limits, model.video.fps, model.video.max_frames)
        stats["video_seconds"].append(video.seconds)
        stats["video_frames"].append(len(video.frames))
        return blob, ".mp4"
    samples = read_audio(blob, limits, model.audio.sampling_rate)
    stats["audio_seconds"].append(samples.size / model.audio.sampling_rate)
    return wav_bytes(samples, model.audio.sampling_rate), ".wav"


def normalise_media(record: Record, base: str, out_dir: Path, data: DataConfig, model: ModelConfig) -> NormalisedMedia:
    """Fetch, check and normalise a record's media into `out_dir/media/<sha256>.<ext>`. The new
    references per kind keep list order (media_order() pairs the n-th <image> tag with images[n])."""
    out = NormalisedMedia()
    for kind, uri in record.media_order():
        blob = fetch_media(uri, base, data)
        if not blob:
            raise Rejected(f"bad {kind}", f"{uri!r} is an empty file (0 bytes)")
        try:
            norm, ext = _normalise(kind, blob, data, model, out.stats)
        except MediaError as err:
            sep = " " if isinstance(err, LimitExceeded) else ": "
            raise Rejected(err.kind or f"bad {kind}", f"{uri!r}{sep}{media_message(err)}") from None
        digest = sha256(norm)
        name = f"media/{digest}{ext}"  # content-addressed: stored once however often it is used
        if not (out_dir / name).exists():
            try:
                (out_dir / name).write_bytes(norm)
            except OSError as err:  # the output's problem (full, read-only), not the record's: stop the run
                raise StorageError(f"cannot write {out_dir / name}: {err.strerror or err}") from err
        out.refs[kind].append(name)
        out.hashes.append(digest)
    return out
