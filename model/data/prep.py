"""Data prep: every input record is validated (schema, text, media), its media decoded and
normalised (RGB PNG, 16 kHz mono WAV, videos checked and kept as uploaded), deduplicated by content,
split train/val by a stable hash, tokenised with the model's processor (training the tokenizer when
the model brings none) and written as tar shards + content-addressed media + manifest
(format: `model/shards.py`, docs/data-format.md).

    prepare(["s3://raw/corpus/", "extra.jsonl"], "s3://omni-data/prepared", data_cfg, model_cfg)

Inputs are JSONL files or folders/prefixes of them, local or s3://; media paths in a record resolve
against its JSONL's folder, in the same store. The output is a folder or s3://bucket/prefix (built
in a local staging folder, then uploaded). An earlier run's manifest is removed first and the new
one written last, so a reader that finds a manifest finds everything it lists; the earlier run's
shards, media and tokenizer files the new run did not write are removed afterwards.

Every non-blank input line ends up either in a shard or in `quarantine.jsonl` with its source,
line, id and a reason that says what is wrong and what to do: `records_in == records_out +
records_quarantined` is checked before anything is reported. Re-runs on the same inputs and config
give byte-identical shards and manifest.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from tqdm import tqdm

from model.config import DataConfig, ModelConfig
from model.data import to_chat_input
from model.media import MediaError, load_audio, load_image, load_video_frames, media_duration
from model.modeling import TOKENIZER_DIR
from model.processor import OmniProcessor
from model.records import Record
from model.shards import (
    FORMAT,
    MANIFEST,
    QUARANTINE,
    SPLITS,
    encoding_fingerprint,
    sha256,
    shard_bytes,
    shard_name,
)
from model.storage import S3Store, StorageError, Store, open_store
from model.tokenizer import load_tokenizer, train_tokenizer

# What to do about each kind of rejection; the reason line is "<kind>: <detail> (<fix>)".
FIXES = {
    "not UTF-8": "save the file as UTF-8",
    "malformed JSON": "each line must be one complete JSON object",
    "invalid record": "see the record format in docs/data-format.md",
    "tag/media mismatch": "give each <image>/<video>/<audio> tag exactly one entry in the media list, in order",
    "unknown media tag": "rename the tag in the text",
    "no answer": "a record without a target teaches nothing: add the answer or drop the record",
    "text too long": "split the conversation or raise data.max_text_chars",
    "missing media": "fix the path (relative paths resolve against the JSONL file's folder) or add the file",
    "bad image": "replace the file with a readable PNG/JPEG/WebP image",
    "image size": "resize the image or change the data.*image* limits",
    "bad video": "replace the file with a readable video (e.g. H.264 mp4) that has frames",
    "video too long": "cut the video or raise data.max_video_seconds",
    "bad audio": "replace the file with readable audio (WAV/FLAC/MP3/OGG) that has an audio stream",
    "audio sample rate": "use a recording made at a higher rate, or lower data.min_audio_sample_rate",
    "audio length": "trim the audio or change data.min_audio_seconds/max_audio_seconds",
    "duplicate": "remove the repeated record",
    "duplicate id": "give every record a unique id",
    "too many tokens": "shorten the conversation or media, or raise model.max_seq_len",
    "not encodable": "the model's processor rejected the sample; check its media against the model config",
    "unexpected error": "a bug in data prep or a decoder: please report it with this line",
}


log = logging.getLogger(__name__)
STATS = ("image_pixels", "video_seconds", "video_frames", "audio_seconds")


class Rejected(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail} ({FIXES[kind]})")
        self.kind = kind


@dataclass
class PrepResult:
    manifest: dict
    out: str  # the output folder or s3:// URI
    quarantined: list[dict] = field(default_factory=list)
    # Raw distributions for reports (the manifest keeps only summaries).
    stats: dict[str, list[float]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputFile:
    uri: str  # how quarantine lines name it
    read: Callable[[], bytes]
    base: str  # the folder (local path or s3://bucket/dir) its relative media paths resolve against


def _bucket(bucket: str) -> Store:
    """A client per bucket, reused across records (the environment gives endpoint and keys)."""
    return _open_bucket(bucket, os.environ.get("S3_ENDPOINT_URL", ""), os.environ.get("AWS_ACCESS_KEY_ID", ""))


@lru_cache(maxsize=16)
def _open_bucket(bucket: str, endpoint: str, access_key: str) -> Store:  # the env values key the cache
    return open_store(f"s3://{bucket}")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def input_files(inputs: list[str | Path]) -> list[InputFile]:
    """JSONL files, or every *.jsonl directly inside a folder / under an s3:// prefix, sorted."""
    files: list[InputFile] = []
    for raw in map(str, inputs):
        if raw.startswith("s3://"):
            bucket, key = _split_s3(raw)
            keys = [key] if key.endswith(".jsonl") else [
                k for k in _bucket(bucket).list(key.rstrip("/") + "/" if key.strip("/") else "")
                if k.endswith(".jsonl") and posixpath.dirname(k) == key.strip("/")]
            files += [InputFile(f"s3://{bucket}/{k}", (lambda b=bucket, k=k: _bucket(b).read_bytes(k)),
                                f"s3://{bucket}/{posixpath.dirname(k)}") for k in keys]
        else:
            path = Path(raw)
            if not path.exists():
                raise FileNotFoundError(f"input {raw} does not exist")
            paths = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
            files += [InputFile(str(p), p.read_bytes, str(p.parent)) for p in paths]
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {', '.join(map(str, inputs))}")
    return files


def fetch_media(uri: str, base: str) -> bytes:
    """A record's media item: an s3:// URI, an absolute path, or a path relative to `base`."""
    try:
        if uri.startswith("s3://") or (base.startswith("s3://") and not os.path.isabs(uri)):
            bucket, key = _split_s3(uri) if uri.startswith("s3://") else _split_s3(base)
            key = posixpath.normpath(key if uri.startswith("s3://") else posixpath.join(key, uri))
            if key.startswith(".."):
                raise Rejected("missing media", f"{uri!r} points outside bucket {bucket!r}")
            return _bucket(bucket).read_bytes(key)
        path = Path(uri) if os.path.isabs(uri) else Path(base) / uri
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return path.read_bytes()
    except FileNotFoundError as err:
        raise Rejected("missing media", f"{uri!r} not found (looked for {err.filename or err})") from None


# ---------------------------------------------------------------------------------- validation


def _media_msg(err: Exception) -> str:
    """MediaError names its source "<N bytes>: ..." (the record's path says more) and FFmpeg's
    messages carry "[Errno N]": drop both."""
    msg = str(err)
    msg = msg.split(": ", 1)[1] if msg.startswith("<") and ": " in msg else msg
    return re.sub(r"\[Errno -?\d+\] ", "", msg)


def _wav_bytes(wave_f32: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(wave_f32, -1, 1) * 32767).round().astype("<i2").tobytes())
    return buf.getvalue()


def _image(uri: str, blob: bytes, data: DataConfig, stats: dict) -> tuple[bytes, str]:
    try:  # the header first: a 30000x30000 "image" is refused before it is decoded
        with Image.open(io.BytesIO(blob)) as head:
            w, h = head.size
    except UnidentifiedImageError:
        raise Rejected("bad image", f"{uri!r} is not a recognised image format ({len(blob)} bytes)") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise Rejected("bad image", f"{uri!r}: unreadable header ({err})") from None
    if w * h > data.max_image_pixels:
        raise Rejected("image size", f"{uri!r} is {w}x{h} = {w * h} pixels, over data.max_image_pixels={data.max_image_pixels}")
    if min(w, h) < data.min_image_side:
        raise Rejected("image size", f"{uri!r} is {w}x{h}, a side under data.min_image_side={data.min_image_side}")
    if max(w, h) / min(w, h) > data.max_image_aspect:
        raise Rejected("image size", f"{uri!r} is {w}x{h}, aspect over data.max_image_aspect={data.max_image_aspect}")
    try:
        img = load_image(blob)  # full decode: truncated files fail here
    except MediaError as err:
        raise Rejected("bad image", f"{uri!r}: {_media_msg(err)}") from None
    stats["image_pixels"].append(w * h)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _video(uri: str, blob: bytes, data: DataConfig, model: ModelConfig, stats: dict) -> tuple[bytes, str]:
    try:
        try:
            seconds: float | None = media_duration(blob)
        except MediaError as err:
            if "duration unknown" not in str(err):
                raise
            seconds = None  # raw streams: the sampled frames' timestamps tell instead
        if seconds is not None and seconds > data.max_video_seconds:
            raise Rejected("video too long", f"{uri!r} is {seconds:.1f} s, over data.max_video_seconds={data.max_video_seconds}")
        frames, times = load_video_frames(blob, model.video.fps, model.video.max_frames)
    except MediaError as err:
        raise Rejected("bad video", f"{uri!r}: {_media_msg(err)}") from None
    seconds = seconds if seconds is not None else times[-1]
    if seconds > data.max_video_seconds:
        raise Rejected("video too long", f"{uri!r} is {seconds:.1f} s, over data.max_video_seconds={data.max_video_seconds}")
    stats["video_seconds"].append(seconds)
    stats["video_frames"].append(len(frames))
    # Kept as uploaded: re-encoding is lossy, and fps/max_frames are model settings a later stage
    # may change; training samples frames by seeking, which costs ~one GOP per frame.
    return blob, ".mp4"


def _audio_header(blob: bytes) -> tuple[int, float | None]:
    """(sample rate, duration or None) from the container, without decoding."""
    with av.open(io.BytesIO(blob)) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        return stream.sample_rate or 0, duration


def _audio(uri: str, blob: bytes, data: DataConfig, model: ModelConfig, stats: dict) -> tuple[bytes, str]:
    rate = model.audio.sampling_rate
    try:
        if not blob:
            raise MediaError("empty input (0 bytes)")
        source_rate, header_seconds = _audio_header(blob)
        if source_rate < data.min_audio_sample_rate:
            raise Rejected("audio sample rate", f"{uri!r} is sampled at {source_rate} Hz, under "
                                        f"data.min_audio_sample_rate={data.min_audio_sample_rate}")
        if header_seconds is not None and header_seconds > data.max_audio_seconds:
            raise Rejected("audio length", f"{uri!r} is {header_seconds:.1f} s, over data.max_audio_seconds={data.max_audio_seconds}")
        samples = load_audio(blob, rate)
    except (MediaError, av.FFmpegError, ValueError) as err:
        detail = _media_msg(err) if isinstance(err, MediaError) else f"cannot open it as audio ({_media_msg(err)})"
        raise Rejected("bad audio", f"{uri!r}: {detail}") from None
    seconds = samples.size / rate
    if seconds > data.max_audio_seconds:  # the header may have had no duration, or lied
        raise Rejected("audio length", f"{uri!r} is {seconds:.1f} s, over data.max_audio_seconds={data.max_audio_seconds}")
    if seconds < data.min_audio_seconds:
        raise Rejected("audio length", f"{uri!r} is {seconds:.3f} s, under data.min_audio_seconds={data.min_audio_seconds}")
    stats["audio_seconds"].append(seconds)
    return _wav_bytes(samples, rate), ".wav"


def _schema_kind(err: ValidationError) -> str:
    text = str(err)
    for needle, kind in (("tag(s) in the text but", "tag/media mismatch"), ("unknown media tag", "unknown media tag"),
                         ("non-empty assistant turn", "no answer")):
        if needle in text:
            return kind
    return "invalid record"


def _parse(raw: bytes, data: DataConfig) -> Record:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise Rejected("not UTF-8", f"invalid byte 0x{raw[err.start]:02x} at byte {err.start} of the line") from None
    except json.JSONDecodeError as err:
        raise Rejected("malformed JSON", f"{err.msg} at column {err.colno}") from None
    except RecursionError:  # e.g. "[[[[..." thousands deep: the parser gives up, the line is not a record
        raise Rejected("malformed JSON", "nested too deeply to parse") from None
    if not isinstance(obj, dict):
        raise Rejected("invalid record", f"expected a JSON object, got {type(obj).__name__}")
    try:
        record = Record.model_validate(obj)
    except ValidationError as err:
        detail = "; ".join(("{}: ".format(".".join(map(str, e["loc"]))) if e["loc"] else "")
                           + e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise Rejected(_schema_kind(err), detail) from None
    chars = 0
    for i, m in enumerate(record.messages):
        try:
            m.content.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. "\ud800" escaped in the JSON: a lone surrogate
            raise Rejected("not UTF-8", f"messages.{i}: unpaired surrogate {m.content[err.start]!r} at character "
                                        f"{err.start}") from None
        chars += len(m.content)
    if chars > data.max_text_chars:
        raise Rejected("text too long", f"{chars} characters, over data.max_text_chars={data.max_text_chars}")
    return record


def _media(record: Record, base: str, out_dir: Path, data: DataConfig, model: ModelConfig
           ) -> tuple[dict[str, list[str]], list[str], dict[str, list[float]]]:
    """Fetch, check and normalise a record's media into `out_dir/media/<sha256>.<ext>`. Returns the
    new references per kind (in list order: media_order() pairs the n-th <image> tag with
    images[n]), the content hashes in tag order, and the measurements for the report."""
    refs: dict[str, list[str]] = {"image": [], "video": [], "audio": []}
    hashes: list[str] = []
    measured: dict[str, list[float]] = {k: [] for k in STATS}
    for kind, uri in record.media_order():
        blob = fetch_media(uri, base)
        if not blob:
            raise Rejected(f"bad {kind}", f"{uri!r} is an empty file (0 bytes)")
        if kind == "image":
            norm, ext = _image(uri, blob, data, measured)
        elif kind == "video":
            norm, ext = _video(uri, blob, data, model, measured)
        else:
            norm, ext = _audio(uri, blob, data, model, measured)
        digest = sha256(norm)
        name = f"media/{digest}{ext}"  # content-addressed: stored once however often it is used
        if not (out_dir / name).exists():
            (out_dir / name).write_bytes(norm)
        refs[kind].append(name)
        hashes.append(digest)
    return refs, hashes, measured


def _split_of(record: Record, media_hashes: list[str], source: str, val_fraction: float) -> str:
    """A file named val*/valid*/test* (or train*) keeps its split. Otherwise a stable hash decides:
    of the first media item when there is one, so every question about the same image or clip
    lands in the same split (no train/val leakage through shared media), else of the id."""
    stem = posixpath.basename(source).lower()
    if stem.startswith(("val", "valid", "test")):
        return "val"
    if stem.startswith("train"):
        return "train"
    key = media_hashes[0] if media_hashes else sha256(record.id.encode())
    return "val" if int(key[:8], 16) / 0xFFFFFFFF < val_fraction else "train"


# ------------------------------------------------------------------------------------- prepare


def prepare(inputs: list[str | Path], out: str | Path, data: DataConfig, model: ModelConfig,
            progress: bool = True) -> PrepResult:
    """Prepare `inputs` into `out` (folder or s3://bucket/prefix); see the module docstring."""
    out = str(out)
    if out.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="omni-prep-") as staging:
            result = _prepare(inputs, Path(staging), data, model, progress)
            _publish(Path(staging), out, progress)
    else:
        result = _prepare(inputs, Path(out), data, model, progress)
    result.out = out
    return result


# The areas of an output prefix a prep run owns: what an earlier run left there and this one did not
# write is removed. Anything else under the prefix (e.g. a report.html a pipeline put there) stays.
_OWNED_AREAS = ("shards/", "media/", "tokenizer/")


def _publish(staging: Path, out: str, progress: bool) -> None:
    """Upload a staged data set to `out` (s3://bucket/prefix), replacing any earlier run there.
    The old manifest goes first and the new one last, so while shards are being overwritten a
    reader finds no manifest (a clear "not found") rather than one listing half-replaced shards."""
    store = open_store(out)
    if not isinstance(store, S3Store):
        raise TypeError(f"{out!r} is not an s3:// URI")
    staged = [k for k in (p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*")) if p.is_file())
              if k != MANIFEST]
    # Media keys are the sha256 of their bytes: one already there from an earlier run is this very file.
    present = set(store.list("media/"))
    store.delete([MANIFEST])
    for key in tqdm([k for k in staged if not (k.startswith("media/") and k in present)], desc="upload",
                    unit="file", disable=not progress):
        store.upload_file(key, staging / key)
    store.upload_file(MANIFEST, staging / MANIFEST)  # last: it vouches for the rest
    written = set(staged)
    stale = [k for area in _OWNED_AREAS for k in store.list(area) if k not in written]
    store.delete(stale)  # after the manifest: no reader of the new one needs them
    if stale:
        log.info("removed %d object(s) of an earlier run from %s", len(stale), out)


def _prepare(inputs: list[str | Path], out_dir: Path, data: DataConfig, model: ModelConfig, progress: bool) -> PrepResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "media").mkdir(exist_ok=True)
    shutil.rmtree(out_dir / "shards", ignore_errors=True)  # a previous run's shards: the manifest lists ours
    (out_dir / "shards").mkdir()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    files = input_files(inputs)
    stats: dict[str, list[float]] = {k: [] for k in STATS}
    quarantine: list[dict] = []
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}  # {"record", "sha256", "origin"}
    seen_content: dict[str, tuple[str, str]] = {}
    seen_ids: dict[str, str] = {}
    inputs_info, records_in = [], 0

    def reject(origin: tuple[str, int], rid: object, reason: str, kind: str) -> None:
        quarantine.append({"source": origin[0], "line": origin[1], "id": rid if isinstance(rid, str) else None,
                           "kind": kind, "reason": reason})

    bar = tqdm(desc="validate", unit="rec", disable=not progress)
    for f in files:
        blob = f.read()
        inputs_info.append({"uri": f.uri, "sha256": sha256(blob)})
        # Windows editors save UTF-8 with a byte-order mark: it is encoding metadata, not line content.
        body = blob.removeprefix(codecs.BOM_UTF8)
        for line_no, raw in enumerate(body.split(b"\n"), 1):
            if not raw.strip():
                continue
            records_in += 1
            bar.update(1)
            origin, rid = (f.uri, line_no), None
            try:
                record = _parse(raw.rstrip(b"\r"), data)
                rid = record.id
                refs, hashes, measured = _media(record, f.base, out_dir, data, model)
                content = sha256(json.dumps([m.model_dump() for m in record.messages], sort_keys=True).encode()
                                 + "".join(hashes).encode())
                if content in seen_content:
                    first_id, where = seen_content[content]
                    raise Rejected("duplicate", f"same text and media as record {first_id!r} ({where})")
                if record.id in seen_ids:
                    raise Rejected("duplicate id", f"id {record.id!r} is already used by the record at {seen_ids[record.id]}")
            except Rejected as err:
                reject(origin, rid if rid is not None else _maybe_id(raw), str(err), err.kind)
                continue
            except StorageError:
                raise  # the store, not the record: stop rather than quarantine good data
            except Exception as err:  # noqa: BLE001 - a record must never crash the run or vanish
                log.exception("unexpected error on %s:%d", f.uri, line_no)
                reject(origin, rid if rid is not None else _maybe_id(raw),
                       f"unexpected error: {type(err).__name__}: {err} ({FIXES['unexpected error']})",
                       "unexpected error")
                continue
            seen_content[content] = (record.id, f"{f.uri}:{line_no}")
            seen_ids[record.id] = f"{f.uri}:{line_no}"
            normalised = record.model_copy(update={k + "s": v for k, v in refs.items()})
            kept[_split_of(record, hashes, f.uri, data.val_fraction)].append(
                {"record": normalised, "sha256": content, "origin": origin, "stats": measured})
    bar.close()

    tokenizer = _tokenizer(model, [k["record"] for k in kept["train"] or kept["val"]])
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    processor = OmniProcessor(tokenizer, model)

    def fetch(key: str) -> bytes:  # the normalised media, staged
        return (out_dir / key).read_bytes()

    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    bar = tqdm(total=sum(map(len, kept.values())), desc="tokenize", unit="rec", disable=not progress)
    for split in SPLITS:
        survivors = []
        for item in kept[split]:
            bar.update(1)
            record = item["record"]
            try:
                try:
                    n = len(processor.encode(to_chat_input(record, None, model, fetch=fetch)).input_ids)
                except Exception as err:  # noqa: BLE001 - ValueError from the processor, or anything else
                    raise Rejected("not encodable", f"{type(err).__name__}: {err}") from None
                if n > model.max_seq_len:
                    raise Rejected("too many tokens", f"{n} tokens, over model.max_seq_len={model.max_seq_len}")
            except Rejected as err:
                reject(item["origin"], record.id, str(err), err.kind)
                continue
            item["num_tokens"] = n
            lengths[split].append(n)
            survivors.append(item)
        kept[split] = survivors
    bar.close()

    for split in SPLITS:  # content-hash order: shards mix sources and tasks whatever the input order
        kept[split].sort(key=lambda i: i["sha256"])
    records_out = sum(len(v) for v in kept.values())
    if records_in != records_out + len(quarantine):  # the contract: nothing vanishes silently
        raise AssertionError(f"record accounting broken: in={records_in} out={records_out} quarantined={len(quarantine)}")

    # Media of records rejected after their media were staged (duplicates, over-long) go again.
    used = {ref for split in SPLITS for i in kept[split] for ref in _media_refs(i["record"])}
    for path in (out_dir / "media").iterdir():
        if f"media/{path.name}" not in used:
            path.unlink()
    shards = _write_shards(out_dir, kept, data.records_per_shard)
    for split in SPLITS:
        (out_dir / f"{split}.jsonl").write_text(
            "".join(json.dumps(i["record"].model_dump(), ensure_ascii=False) + "\n" for i in kept[split]), encoding="utf-8")
    (out_dir / QUARANTINE).write_text(
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine), encoding="utf-8")
    manifest = _manifest(inputs_info, records_in, kept, quarantine, lengths, shards, out_dir, data, model, processor)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for item in (i for split in SPLITS for i in kept[split]):
        for key, values in item["stats"].items():
            stats[key].extend(values)
    stats.update({f"tokens_{s}": [float(n) for n in lengths[s]] for s in SPLITS})
    return PrepResult(manifest=manifest, out=str(out_dir), quarantined=quarantine, stats=stats)


def _maybe_id(raw: bytes) -> str | None:
    """The id of a line rejected before it became a Record, if it has one. Never raises: it runs
    inside the error handlers (a line nested too deep for the parser fails here as it did there)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else None


def _media_refs(record: Record) -> list[str]:
    return [*record.images, *record.videos, *record.audios]


def _write_shards(out_dir: Path, kept: dict[str, list[dict]], per_shard: int) -> list[dict]:
    shards = []
    for split in SPLITS:
        items = kept[split]
        for n, start in enumerate(range(0, len(items), per_shard)):
            chunk = items[start:start + per_shard]
            blob = shard_bytes((f"{start + i:09d}", {"record": it["record"].model_dump(), "num_tokens": it["num_tokens"],
                                                     "sha256": it["sha256"]}) for i, it in enumerate(chunk))
            path = shard_name(split, n)
            (out_dir / path).write_bytes(blob)
            shards.append({"path": path, "split": split, "records": len(chunk), "bytes": len(blob), "sha256": sha256(blob)})
    return shards


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {"count": len(values), "total": round(float(sum(values)), 3), "min": round(float(min(values)), 3),
            "mean": round(float(np.mean(values)), 3), "max": round(float(max(values)), 3)}


def _manifest(inputs_info, records_in, kept, quarantine, lengths, shards, out_dir, data, model, processor) -> dict:
    records = [i["record"] for split in SPLITS for i in kept[split]]
    modalities = {kind: {"records": sum(1 for r in records if getattr(r, kind + "s")),
                         "items": sum(len(getattr(r, kind + "s")) for r in records)} for kind in ("image", "video", "audio")}
    modalities["text_only"] = {"records": sum(1 for r in records if not (r.images or r.videos or r.audios))}
    media = sorted((out_dir / "media").iterdir())
    tok_files = sorted(p for p in (out_dir / "tokenizer").rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "inputs": inputs_info,
        "records_in": records_in,
        "records_out": len(records),
        "records_quarantined": len(quarantine),
        "quarantine_reasons": dict(sorted(Counter(q["kind"] for q in quarantine).items())),
        "splits": {s: len(kept[s]) for s in SPLITS},
        "tasks": dict(sorted(Counter(r.task for r in records).items())),
        "tasks_per_split": {s: dict(sorted(Counter(i["record"].task for i in kept[s]).items())) for s in SPLITS},
        "modalities": modalities,
        "tokens": {s: _summary(lengths[s]) for s in SPLITS},
        "media": {"files": len(media), "bytes": sum(p.stat().st_size for p in media)},
        "shards": shards,
        "config_sha256": sha256(json.dumps({"data": data.model_dump(), "model": model.model_dump()}, sort_keys=True).encode()),
        "tokenizer_sha256": sha256(b"".join(p.relative_to(out_dir).as_posix().encode() + p.read_bytes() for p in tok_files)),
        "encoding_fingerprint": encoding_fingerprint(processor),
    }
    manifest["sha256"] = sha256(json.dumps(manifest, sort_keys=True).encode())
    return manifest


def _tokenizer(model: ModelConfig, records: list[Record]):
    """The tokenizer training will use: the configured one, the pretrained checkpoint's, or (tiny
    and small configs) a BPE trained here on the training records."""
    if model.tokenizer.path:
        return load_tokenizer(model.tokenizer.path)
    if model.pretrained:
        return load_tokenizer(Path(model.pretrained) / TOKENIZER_DIR)
    texts = [m.content for r in records for m in r.messages]
    # Role names and digits/letters appear in every prompt: make sure they are in the corpus.
    texts += ["system user assistant", "0123456789 ABCD abcdefghijklmnopqrstuvwxyz"]
    return train_tokenizer(texts, model.tokenizer.vocab_size)
