"""Data prep: every input record is validated (schema, text, media), its media decoded and
normalised (RGB PNG, 16 kHz mono WAV, videos checked and kept as uploaded), deduplicated by content,
split train/val by a stable hash, tokenised with the model's processor (training the tokenizer when
the model brings none) and written as tar shards + content-addressed media + manifest
(format: `model.data.shards`, docs/data-format.md).

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
import json
import logging
import posixpath
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.config import DataConfig, ModelConfig
from model.data.inputs import InputFile, check_s3_settings, input_files, printable
from model.data.loading import to_chat_input
from model.data.normalise import STATS, normalise_media
from model.data.quarantine import FIXES, Rejected
from model.data.records import Record
from model.data.shards import (
    FORMAT,
    MANIFEST,
    QUARANTINE,
    SPLITS,
    encoding_fingerprint,
    sha256,
    shard_bytes,
    shard_name,
)
from model.data.validate import maybe_id, parse_record
from model.media.inputs import use_audio_in_video
from model.nn.checkpoint import TOKENIZER_DIR
from model.nn.sources import resolve, start_tokenizer
from model.storage import S3Store, StorageError, open_store
from model.text.processor import OmniProcessor
from model.text.tokenizer import BASE_CORPUS, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PrepResult:
    manifest: dict
    out: str  # the output folder or s3:// URI
    quarantined: list[dict] = field(default_factory=list)
    # Raw distributions for reports (the manifest keeps only summaries).
    stats: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Kept:
    """A record that passed validation: its media normalised, its place in the input, its measurements."""

    record: Record  # media references rewritten to the normalised, content-addressed files
    sha256: str  # of its text and media: the dedup key, and the shard order
    origin: tuple[str, int]  # (input file, line)
    media_hashes: list[str]  # content hashes of its media, in tag order
    stats: dict[str, list[float]]
    num_tokens: int = 0


@dataclass
class Ledger:
    """Every input line's fate: kept (per split) or quarantined; `check` proves nothing vanished."""

    inputs: list[dict] = field(default_factory=list)  # {"uri", "sha256"} per input file
    records_in: int = 0
    quarantine: list[dict] = field(default_factory=list)
    kept: dict[str, list[Kept]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    # Dedup: content hash -> (first record id, "file:line"), record id -> "file:line".
    seen_content: dict[str, tuple[str, str]] = field(default_factory=dict)
    seen_ids: dict[str, str] = field(default_factory=dict)

    def keep(self, item: Kept, split: str) -> None:
        where = f"{item.origin[0]}:{item.origin[1]}"
        self.seen_content[item.sha256] = (item.record.id, where)
        self.seen_ids[item.record.id] = where
        self.kept[split].append(item)

    def reject(self, origin: tuple[str, int], rid: object, reason: str, kind: str) -> None:
        # printable: whatever a reason quotes (an exception's text, say) is written as valid UTF-8.
        self.quarantine.append({"source": origin[0], "line": origin[1],
                                "id": printable(rid) if isinstance(rid, str) else None,
                                "kind": kind, "reason": printable(reason)})

    def all_kept(self) -> list[Kept]:
        return [k for split in SPLITS for k in self.kept[split]]

    def check(self) -> None:
        out = len(self.all_kept())
        if self.records_in != out + len(self.quarantine):  # the contract: nothing vanishes silently
            raise AssertionError(f"record accounting broken: in={self.records_in} out={out} "
                                 f"quarantined={len(self.quarantine)}")


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
    files = input_files(inputs)
    _check_run(files, out)
    model = resolve(model)  # placeholder counts follow the starting checkpoints' architecture
    if out.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="omni-prep-") as staging:
            result = _prepare(files, Path(staging), data, model, progress)
            _publish(Path(staging), out, progress)
    else:
        result = _prepare(files, Path(out), data, model, progress)
    result.out = out
    return result


def _check_run(files: list[InputFile], out: str) -> None:
    """The run-level problems, found before any work: S3 settings a run will need, an output store
    that cannot be reached, an output folder that cannot be written."""
    check_s3_settings(files, out)
    if out.startswith("s3://"):
        open_store(out).exists(MANIFEST)  # reachable, with these credentials (StorageError if not)
        return
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise StorageError(f"the output folder {out} cannot be written: {err.strerror or err}") from None


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
    todo = [k for k in staged if not (k.startswith("media/") and k in present)]
    done = 0
    try:
        for key in tqdm(todo, desc="upload", unit="file", disable=not progress):
            store.upload_file(key, staging / key)
            done += 1
        store.upload_file(MANIFEST, staging / MANIFEST)  # last: it vouches for the rest
    except StorageError as err:  # after the store's own retries with backoff
        raise StorageError(f"uploading the prepared data set to {out} stopped after {done} of {len(todo)} files: "
                           f"{err}. "
                           "No manifest is there, so no reader takes the partial upload for a data set; re-run "
                           "the prep (media already uploaded are not sent again)") from err
    written = set(staged)
    stale = [k for area in _OWNED_AREAS for k in store.list(area) if k not in written]
    store.delete(stale)  # after the manifest: no reader of the new one needs them
    if stale:
        log.info("removed %d object(s) of an earlier run from %s", len(stale), out)


def _prepare(files: list[InputFile], out_dir: Path, data: DataConfig, model: ModelConfig,
             progress: bool) -> PrepResult:
    """validate -> normalise (inside validation, per record) -> tokenise -> write."""
    _reset_output(out_dir)
    ledger = Ledger()
    _validate(files, out_dir, data, model, ledger, progress)
    processor = _tokenise(ledger, out_dir, model, progress)
    manifest = _write(ledger, out_dir, data, model, processor)
    stats: dict[str, list[float]] = {k: [] for k in STATS}
    for item in ledger.all_kept():
        for key, values in item.stats.items():
            stats[key].extend(values)
    stats.update({f"tokens_{s}": [float(k.num_tokens) for k in ledger.kept[s]] for s in SPLITS})
    return PrepResult(manifest=manifest, out=str(out_dir), quarantined=ledger.quarantine, stats=stats)


def _reset_output(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "media").mkdir(exist_ok=True)
    shutil.rmtree(out_dir / "shards", ignore_errors=True)  # a previous run's shards: the manifest lists ours
    (out_dir / "shards").mkdir()
    (out_dir / MANIFEST).unlink(missing_ok=True)


def _validate(
    files: list[InputFile], out_dir: Path, data: DataConfig, model: ModelConfig, ledger: Ledger, progress: bool
) -> None:
    """Every non-blank line of every file: parsed, media normalised, deduplicated, given its split."""
    with tqdm(desc="validate", unit="rec", disable=not progress) as bar:
        for f in files:
            blob = f.read()
            ledger.inputs.append({"uri": f.uri, "sha256": sha256(blob)})
            # Windows editors save UTF-8 with a byte-order mark: it is encoding metadata, not line content.
            for line_no, raw in enumerate(blob.removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
                if not raw.strip():
                    continue
                ledger.records_in += 1
                bar.update(1)
                item = _validate_line(raw.rstrip(b"\r"), (f, line_no), out_dir, data, model, ledger)
                if item is not None:
                    ledger.keep(item, _split_of(item.record, item.media_hashes, f.uri, data.val_fraction))


def _validate_line(
    raw: bytes, where: tuple[InputFile, int], out_dir: Path, data: DataConfig, model: ModelConfig, ledger: Ledger
) -> Kept | None:
    """One line -> a kept record, or None after quarantining it; never raises for the record's sake."""
    f, line_no = where
    origin, rid = (f.uri, line_no), None
    try:
        record = parse_record(raw, data)
        rid = record.id
        media = normalise_media(record, f.base, out_dir, data, model)
        # The same video heard or not is a different sample: the switch joins the key (only when on,
        # so records without sound keep the keys they always had).
        heard = bool(record.videos) and use_audio_in_video(record.use_audio_in_video, model)
        content = sha256(
            json.dumps([m.model_dump() for m in record.messages], sort_keys=True).encode()
            + "".join(media.hashes).encode()
            + (b"\0use_audio_in_video" if heard else b"")
        )
        if content in ledger.seen_content:
            first_id, first = ledger.seen_content[content]
            raise Rejected("duplicate", f"same text and media as record {first_id!r} ({first})")
        if record.id in ledger.seen_ids:
            raise Rejected(
                "duplicate id", f"id {record.id!r} is already used by the record at {ledger.seen_ids[record.id]}"
            )
    except Rejected as err:
        ledger.reject(origin, rid if rid is not None else maybe_id(raw), str(err), err.kind)
        return None
    except StorageError:
        raise  # the store, not the record: stop rather than quarantine good data
    except Exception as err:  # noqa: BLE001 - a record must never crash the run or vanish
        log.exception("unexpected error on %s:%d", f.uri, line_no)
        ledger.reject(
            origin,
            rid if rid is not None else maybe_id(raw),
            f"unexpected error: {type(err).__name__}: {err} ({FIXES['unexpected error']})",
            "unexpected error",
        )
        return None
    # The switch as prep resolved it, so training reads the sound whatever the model's default becomes.
    sound = {"use_audio_in_video": heard} if record.videos else {}
    normalised = record.model_copy(update={**{k + "s": v for k, v in media.refs.items()}, **sound})
    return Kept(normalised, content, origin, media.hashes, media.stats)


def _tokenise(ledger: Ledger, out_dir: Path, model: ModelConfig, progress: bool) -> OmniProcessor:
    """The tokenizer (saved into the output), then every kept record's token count; over-long or
    unencodable records go to quarantine."""
    tokenizer = _tokenizer(model, [k.record for k in ledger.kept["train"] or ledger.kept["val"]])
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
    processor = OmniProcessor(tokenizer, model)

    def fetch(key: str) -> bytes:  # the normalised media, staged
        return (out_dir / key).read_bytes()

    with tqdm(total=len(ledger.all_kept()), desc="tokenize", unit="rec", disable=not progress) as bar:
        for split in SPLITS:
            survivors = []
            for item in ledger.kept[split]:
                bar.update(1)
                try:
                    item.num_tokens = _count_tokens(processor, item.record, fetch, model)
                except Rejected as err:
                    ledger.reject(item.origin, item.record.id, str(err), err.kind)
                    continue
                survivors.append(item)
            ledger.kept[split] = survivors
    return processor


def _count_tokens(processor: OmniProcessor, record: Record, fetch, model: ModelConfig) -> int:
    try:
        n = len(processor.encode(to_chat_input(record, None, model, fetch=fetch)).input_ids)
    except Exception as err:  # noqa: BLE001 - ValueError from the processor, or anything else
        raise Rejected("not encodable", f"{type(err).__name__}: {err}") from None
    if n > model.max_seq_len:
        raise Rejected("too many tokens", f"{n} tokens, over model.max_seq_len={model.max_seq_len}")
    return n


def _write(ledger: Ledger, out_dir: Path, data: DataConfig, model: ModelConfig, processor: OmniProcessor) -> dict:
    """Shards (content-hash order: they mix sources and tasks whatever the input order), the
    quarantine file and, last, the manifest."""
    for split in SPLITS:
        ledger.kept[split].sort(key=lambda k: k.sha256)
    ledger.check()
    # Media of records rejected after their media were staged (duplicates, over-long) go again.
    used = {ref for k in ledger.all_kept() for ref in _media_refs(k.record)}
    for path in (out_dir / "media").iterdir():
        if f"media/{path.name}" not in used:
            path.unlink()
    shards = _write_shards(out_dir, ledger.kept, data.records_per_shard)
    (out_dir / QUARANTINE).write_text("".join(_jsonl_line(q) for q in ledger.quarantine), encoding="utf-8")
    manifest = _manifest(ledger, shards, out_dir, {"data": data.model_dump(), "model": model.model_dump()}, processor)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


# Line breaks to Unicode (and so to str.splitlines, JavaScript, many editors) that JSON leaves raw.
_UNICODE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl_line(obj: dict) -> str:
    """One JSONL line, readable as text (non-ASCII kept) and one line to every reader."""
    return json.dumps(obj, ensure_ascii=False).translate(_UNICODE_BREAKS) + "\n"


def _media_refs(record: Record) -> list[str]:
    return [*record.images, *record.videos, *record.audios]


def _write_shards(out_dir: Path, kept: dict[str, list[Kept]], per_shard: int) -> list[dict]:
    shards = []
    for split in SPLITS:
        items = kept[split]
        for n, start in enumerate(range(0, len(items), per_shard)):
            chunk = items[start : start + per_shard]
            blob = shard_bytes(
                (f"{start + i:09d}", {"record": k.record.model_dump(), "num_tokens": k.num_tokens, "sha256": k.sha256})
                for i, k in enumerate(chunk)
            )
            path = shard_name(split, n)
            (out_dir / path).write_bytes(blob)
            shards.append(
                {"path": path, "split": split, "records": len(chunk), "bytes": len(blob), "sha256": sha256(blob)}
            )
    return shards


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "total": round(float(sum(values)), 3),
        "min": round(float(min(values)), 3),
        "mean": round(float(np.mean(values)), 3),
        "max": round(float(max(values)), 3),
    }


def _manifest(ledger: Ledger, shards: list[dict], out_dir: Path, config: dict, processor: OmniProcessor) -> dict:
    kept = ledger.kept
    records = [k.record for k in ledger.all_kept()]
    modalities = {
        kind: {
            "records": sum(1 for r in records if getattr(r, kind + "s")),
            "items": sum(len(getattr(r, kind + "s")) for r in records),
        }
        for kind in ("image", "video", "audio")
    }
    modalities["text_only"] = {"records": sum(1 for r in records if not (r.images or r.videos or r.audios))}
    media = sorted((out_dir / "media").iterdir())
    tok_files = sorted(p for p in (out_dir / TOKENIZER_DIR).rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "inputs": ledger.inputs,
        "records_in": ledger.records_in,
        "records_out": len(records),
        "records_quarantined": len(ledger.quarantine),
        "quarantine_reasons": dict(sorted(Counter(q["kind"] for q in ledger.quarantine).items())),
        "splits": {s: len(kept[s]) for s in SPLITS},
        "tasks": dict(sorted(Counter(r.task for r in records).items())),
        "tasks_per_split": {s: dict(sorted(Counter(k.record.task for k in kept[s]).items())) for s in SPLITS},
        "modalities": modalities,
        "tokens": {s: _summary([k.num_tokens for k in kept[s]]) for s in SPLITS},
        "media": {"files": len(media), "bytes": sum(p.stat().st_size for p in media)},
        "shards": shards,
        "config_sha256": sha256(json.dumps(config, sort_keys=True).encode()),
        "tokenizer_sha256": sha256(
            b"".join(p.relative_to(out_dir).as_posix().encode() + p.read_bytes() for p in tok_files)
        ),
        "encoding_fingerprint": encoding_fingerprint(processor),
    }
    manifest["sha256"] = sha256(json.dumps(manifest, sort_keys=True).encode())
    return manifest


def _tokenizer(model: ModelConfig, records: list[Record]):
    """The tokenizer training will use (`model.nn.sources.tokenizer_source`: the configured one, the
    omni checkpoint's, the LLM's), or (tiny and small configs) a BPE trained here on the records."""
    if (tok := start_tokenizer(model)) is not None:
        return tok
    texts = [m.content for r in records for m in r.messages]
    return train_tokenizer([*texts, *BASE_CORPUS], model.tokenizer.vocab_size)
