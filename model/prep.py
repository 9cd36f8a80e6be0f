"""Data prep: validate every record and its media, normalise media, deduplicate, split, train the
tokenizer (when the model has none), drop over-long samples, write the prepared set + manifest.

Every input line ends up either in the output or in `quarantine.jsonl` with a reason:
`records_in == records_out + records_quarantined` is checked before anything is reported.
"""

from __future__ import annotations

import hashlib
import io
import json
import wave
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from model.config import DataConfig, ModelConfig
from model.data import resolve, to_chat_input
from model.media import MediaError, load_audio, load_image, load_video_frames
from model.processor import OmniProcessor
from model.records import Record
from model.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class PrepResult:
    manifest: dict
    out_dir: Path
    quarantined: list[dict] = field(default_factory=list)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wav_bytes(wave_f32: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(wave_f32, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _normalise_media(kind: str, src: Path, data: DataConfig, model: ModelConfig) -> tuple[bytes, str]:
    """Decode (so corrupt files fail here, not in training), check limits, return canonical bytes."""
    if kind == "image":
        img = load_image(src)
        if img.width * img.height > data.max_image_pixels:
            raise MediaError(f"image is {img.width}x{img.height}, over data.max_image_pixels={data.max_image_pixels}")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    if kind == "video":
        frames, stamps = load_video_frames(src, model.video.fps, model.video.max_frames)
        if stamps and stamps[-1] > data.max_video_seconds:
            raise MediaError(f"video longer than data.max_video_seconds={data.max_video_seconds}")
        return Path(src).read_bytes(), Path(src).suffix or ".mp4"
    audio = load_audio(src, model.audio.sampling_rate)
    seconds = audio.size / model.audio.sampling_rate
    if seconds > data.max_audio_seconds:
        raise MediaError(f"audio is {seconds:.1f} s, over data.max_audio_seconds={data.max_audio_seconds}")
    if seconds < 0.1:
        raise MediaError(f"audio is {seconds:.3f} s: too short to hold speech")
    return _wav_bytes(audio, model.audio.sampling_rate), ".wav"


def _split_of(record_id: str, source_file: Path, val_fraction: float) -> str:
    """A file named val*/valid*/test* keeps its split; otherwise a stable hash of the id decides."""
    if source_file.stem.lower().startswith(("val", "valid", "test")):
        return "val"
    if source_file.stem.lower().startswith("train"):
        return "train"
    bucket = int(_sha256(record_id.encode())[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def input_files(inputs: list[Path]) -> list[Path]:
    files = []
    for p in inputs:
        files.extend(sorted(p.glob("*.jsonl")) if p.is_dir() else [p])
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {', '.join(map(str, inputs))}")
    return files


def prepare(inputs: list[Path], out_dir: Path, data: DataConfig, model: ModelConfig, progress: bool = True) -> PrepResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "media").mkdir(exist_ok=True)
    files = input_files(inputs)
    quarantine: list[dict] = []
    kept: dict[str, list[dict]] = {"train": [], "val": []}
    seen: dict[str, str] = {}
    origin: dict[str, tuple[Path, int]] = {}  # record id -> where it came from, for late rejects
    records_in = 0

    def reject(src: Path, line_no: int, rid: str | None, reason: str) -> None:
        quarantine.append({"source": str(src), "line": line_no, "id": rid, "reason": reason})

    lines = [(f, i, raw) for f in files for i, raw in enumerate(f.read_bytes().splitlines(), 1) if raw.strip()]
    for src, line_no, raw in tqdm(lines, desc="data prep", unit="rec", disable=not progress):
        records_in += 1
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            reject(src, line_no, None, f"not UTF-8: {err}")
            continue
        except json.JSONDecodeError as err:
            reject(src, line_no, None, f"malformed JSON: {err.msg} at column {err.colno}")
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        try:
            record = Record.model_validate(obj)
        except ValidationError as err:
            reject(src, line_no, rid, "invalid record: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in err.errors()))
            continue
        try:
            new_uris, hashes = {}, []
            for kind in ("image", "video", "audio"):
                new_uris[kind] = []
                for uri in getattr(record, kind + "s"):
                    path = resolve(uri, src.parent)
                    if not Path(path).exists():
                        raise MediaError(f"{kind} file not found: {uri}")
                    blob, ext = _normalise_media(kind, Path(path), data, model)
                    digest = _sha256(blob)
                    name = f"media/{digest[:32]}{ext}"  # content-addressed: stored once however often used
                    if not (out_dir / name).exists():
                        (out_dir / name).write_bytes(blob)
                    new_uris[kind].append(name)
                    hashes.append(digest)
        except (MediaError, OSError, ValueError) as err:
            reject(src, line_no, record.id, f"bad media: {err}")
            continue
        content_key = _sha256(json.dumps([m.model_dump() for m in record.messages], sort_keys=True).encode()
                              + "".join(hashes).encode())
        if content_key in seen:
            reject(src, line_no, record.id, f"duplicate of record {seen[content_key]!r} (same text and media)")
            continue
        seen[content_key] = record.id
        origin[record.id] = (src, line_no)
        normalised = record.model_copy(update={"images": new_uris["image"], "videos": new_uris["video"],
                                               "audios": new_uris["audio"]})
        kept[_split_of(record.id, src, data.val_fraction)].append(normalised.model_dump())

    tokenizer = _tokenizer(model, kept["train"] or kept["val"])
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    processor = OmniProcessor(tokenizer, model)
    lengths: dict[str, list[int]] = {"train": [], "val": []}
    for split in kept:
        survivors = []
        for rec in kept[split]:
            record = Record.model_validate(rec)
            n = len(processor.encode(to_chat_input(record, out_dir, model)).input_ids)
            if n > model.max_seq_len:
                reject(*origin[record.id], record.id, f"{n} tokens > model.max_seq_len={model.max_seq_len}")
                continue
            lengths[split].append(n)
            survivors.append(rec)
        kept[split] = survivors

    shards = []
    for split, recs in kept.items():
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        shards.append({"path": path.name, "split": split, "records": len(recs), "sha256": _sha256(path.read_bytes())})
    with open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine)

    records_out = sum(len(v) for v in kept.values())
    if records_in != records_out + len(quarantine):  # the contract: nothing vanishes silently
        raise AssertionError(f"record accounting broken: in={records_in} out={records_out} quarantined={len(quarantine)}")
    all_records = [r for recs in kept.values() for r in recs]
    manifest = {
        "records_in": records_in,
        "records_out": records_out,
        "records_quarantined": len(quarantine),
        "quarantine_reasons": dict(Counter(q["reason"].split(":")[0] for q in quarantine)),
        "splits": {k: len(v) for k, v in kept.items()},
        "tasks": dict(Counter(r["task"] for r in all_records)),
        "modalities": {k: sum(len(r[k + "s"]) for r in all_records) for k in ("image", "video", "audio")},
        "tokens": {k: {"total": sum(v), "max": max(v, default=0)} for k, v in lengths.items()},
        "shards": shards,
        "media_files": len(list((out_dir / "media").iterdir())),
    }
    manifest["sha256"] = _sha256(json.dumps(manifest, sort_keys=True).encode())
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return PrepResult(manifest=manifest, out_dir=out_dir, quarantined=quarantine)


def _tokenizer(model: ModelConfig, records: list[dict]):
    if model.tokenizer.path:
        return load_tokenizer(model.tokenizer.path)
    texts = [m["content"] for r in records for m in r["messages"]]
    # Role names and digits/letters appear in every prompt: make sure they are in the corpus.
    texts += ["system user assistant", "0123456789 ABCD abcdefghijklmnopqrstuvwxyz"]
    return train_tokenizer(texts, model.tokenizer.vocab_size)

