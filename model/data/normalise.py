"""A record's media, fetched, checked against the data limits and normalised into content-addressed
files: images as RGB PNG, audio as 16 kHz mono WAV, videos kept as uploaded (re-encoding is lossy,
and fps / max_frames are model settings a later stage may change; training samples frames by
seeking, which costs about one GOP per frame), their sound tracks too: a video read with its sound
(`use_audio_in_video`) has that sound checked here, under the video's limits."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from model.config import DataConfig, ModelConfig
from model.data.inputs import fetch_media
from model.data.quarantine import Rejected
from model.data.records import Record
from model.data.shards import sha256
from model.media.decode import MediaError, wav_bytes
from model.media.inputs import MediaReader, RawMedia
from model.media.limits import MediaLimits
from model.storage import StorageError

STATS = ("image_pixels", "video_seconds", "video_frames", "audio_seconds")


def data_limits(data: DataConfig) -> MediaLimits:
    return MediaLimits.of("data", data)


@dataclass
class NormalisedMedia:
    refs: dict[str, list[str]] = field(default_factory=lambda: {"image": [], "video": [], "audio": []})
    hashes: list[str] = field(default_factory=list)  # content hashes in tag order
    stats: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in STATS})


def _normalise(item: RawMedia, reader: MediaReader, stats: dict) -> tuple[bytes, str]:
    """(normalised bytes, extension) of one item; raises MediaError with the problem's kind."""
    decoded = reader.read(item)
    if item.kind == "image":
        stats["image_pixels"].append(decoded.width * decoded.height)
        buf = io.BytesIO()
        decoded.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    if item.kind == "video":
        stats["video_seconds"].append(decoded.seconds)
        stats["video_frames"].append(len(decoded.frames))
        return item.data, ".mp4"
    rate = reader.cfg.audio.sampling_rate
    stats["audio_seconds"].append(decoded.size / rate)
    return wav_bytes(decoded, rate), ".wav"


def normalise_media(record: Record, base: str, out_dir: Path, data: DataConfig, model: ModelConfig) -> NormalisedMedia:
    """Fetch, check and normalise a record's media into `out_dir/media/<sha256>.<ext>`. The new
    references per kind keep list order (media_order() pairs the n-th <image> tag with images[n])."""
    out, reader = NormalisedMedia(), MediaReader(model, data_limits(data))
    for kind, uri in record.media_order():
        blob = fetch_media(uri, base, data)
        if not blob:
            raise Rejected(f"bad {kind}", f"{uri!r} is an empty file (0 bytes)")
        try:
            norm, ext = _normalise(RawMedia(kind, blob, repr(uri), record.use_audio_in_video), reader, out.stats)
        except MediaError as err:  # its message names the item: "'a.png' is 9000x20, ..."
            raise Rejected(err.kind or f"bad {kind}", str(err)) from None
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
