"""Prepared data: the shard format data prep writes, and the reader training, the SFT filter and
evaluation consume (the shards are the one copy of the prepared records).

A prepared data set is a folder or an `s3://bucket/prefix` (docs/data-format.md has the full spec):

    manifest.json                 counts, the shard list with sha256, config/tokenizer hashes (written last)
    quarantine.jsonl              one line per rejected input record, with the reason
    shards/{split}-{n:06d}.tar    WebDataset-style tar: one `<key>.json` member per sample
    media/<sha256>.png|wav|mp4    every distinct media item once, named by its content hash
    tokenizer/                    the tokenizer the token counts were computed with

A sample (`<key>.json`, key = the sample's index in its split, 9 digits):

    {"record": {<the Record: id, task, messages, images: ["media/<sha256>.png"], ...>},
     "num_tokens": 211, "sha256": "<content hash of text + media>"}

Why records and not token ids: the pixel / mel tensors have to be computed from the media at
train time anyway (stored as float tensors they would be ~50x the PNG), and they come out of the
same `OmniProcessor.encode` call that lays out the placeholder runs. Re-encoding the text costs
~nothing next to decoding media, and it cannot go stale when the processor changes (AnyRes tiling,
new special tokens) or a stage loads another tokenizer. What prep stores instead is each sample's
`num_tokens` (for length filtering, packing plans and reports) and the processor's
`encoding_fingerprint`; the reader refuses shards whose fingerprint or token counts no longer
match the processor it is given, instead of training on silently different sequences.

Media live outside the shards, once each, because real corpora reuse them (several questions per
image, the same clip in several tasks); the shards are then small (JSON only), so every rank can
read every shard's index cheaply and split the *samples* evenly, whatever the shard count.

The reader (`ShardStream`) is an `IterableDataset` yielding `Encoded` samples (or packed rows):

- order: per epoch, shards in a seeded shuffled order, then a seeded shuffle buffer across shard
  boundaries; a pure function of (seed, epoch), so re-runs and resumes see the same sequence;
- distributed: sample i of the shuffled stream goes to rank i % world_size;
- DataLoader workers: whole batches round-robin (batch b to worker b % num_workers), which is the
  order DataLoader merges them in, so the batches are the same with 0 or N workers;
- resume: `load_state_dict({"items": n})` skips the first n items of this rank's stream by
  reading the JSON index only (no media decoding), so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import wave
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from model import runtime
from model.data.loading import to_chat_input
from model.data.packing import plan_bins
from model.data.records import Record
from model.storage import Store, open_store
from model.text.processor import Encoded, OmniProcessor

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
FORMAT = "omni-shards/1"
SPLITS = ("train", "val")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ writing


def shard_name(split: str, index: int) -> str:
    return f"shards/{split}-{index:06d}.tar"


def shard_bytes(samples: Iterable[tuple[str, dict]]) -> bytes:
    """A tar of `<key>.json` members. Byte-identical for identical samples: fixed mtime/owner/mode,
    ustar format (no pax headers with timestamps), JSON with sorted keys."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in samples:
            data = json.dumps(sample, ensure_ascii=False, sort_keys=True).encode("utf-8")
            info = tarfile.TarInfo(f"{key}.json")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_shard(data: bytes) -> Iterator[dict]:
    """The samples of one shard, in order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())


# ------------------------------------------------------------------------------ fingerprint


@lru_cache(maxsize=1)
def _probe_media() -> dict[str, bytes]:
    """Fixed, tiny media for `encoding_fingerprint`: a non-square PNG, a 2-frame mp4, 1 s of WAV."""
    png = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 40, 40)).save(png, format="PNG")
    mp4 = io.BytesIO()
    with av.open(mp4, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(2):
            frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), (40, 40, 200)))
            frame.pts, frame.time_base = i, Fraction(1, 1)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    wav = io.BytesIO()
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 32767).astype("<i2")
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone.tobytes())
    return {"p.png": png.getvalue(), "p.mp4": mp4.getvalue(), "p.wav": wav.getvalue()}


def encoding_fingerprint(processor: OmniProcessor) -> str:
    """Hash of the ids and labels the processor gives one fixed probe conversation (text, image,
    video, audio). Same tokenizer + same encoding rules -> same fingerprint; a change to either
    (placeholder counts, special tokens, chat template) changes it."""
    media = _probe_media()
    record = Record(id="probe", images=["p.png"], videos=["p.mp4"], audios=["p.wav"], messages=[
        {"role": "system", "content": "probe 0123"},
        {"role": "user", "content": "<image> <video> <audio> What is it? A. x B. y"},
        {"role": "assistant", "content": "B"}])
    enc = processor.encode(to_chat_input(record, None, processor.cfg, fetch=media.__getitem__))
    return sha256(json.dumps([enc.input_ids, enc.labels]).encode())


# ------------------------------------------------------------------------------------ reading


class StaleShardsError(RuntimeError):
    """The shards were tokenised with a different processor than the one training uses."""


def _encoded_bytes(e: Encoded) -> int:
    """Memory an encoded sample holds: its media tensors and its id lists (8 bytes an int)."""
    tensors = [*e.pixel_values, *e.video_pixel_values, *e.audio_mel]
    return sum(t.numel() * t.element_size() for t in tensors) + 8 * (len(e.input_ids) + len(e.labels))


class ShardStream(IterableDataset):
    """Streams one split of a prepared data set (local folder or s3:// URI) as encoded samples.

        stream = ShardStream("s3://omni-data/prepared", "train", tasks=["caption"])
        stream.configure(processor, batch_size=8)          # the rank comes from torch.distributed
        for batch in DataLoader(stream, batch_size=8, collate_fn=processor.collate, num_workers=2): ...

    `epochs=None` repeats forever (training counts steps, not epochs). `exclude_ids` leaves those
    record ids out (e.g. what the SFT loss filter dropped). `num_workers` is what `train_stage`
    gives its DataLoader; `cache_bytes` bounds the in-memory cache of encoded samples (per process:
    each DataLoader worker has its own)."""

    def __init__(self, root: str | Path | Store, split: str = "train", tasks: list[str] | None = None, *,
                 seed: int = 0, shuffle_buffer: int = 1024, epochs: int | None = None,
                 exclude_ids: set[str] | None = None, cache_bytes: int = 0, num_workers: int = 0):
        super().__init__()
        self.store = open_store(str(root)) if isinstance(root, str | Path) else root
        self.manifest = json.loads(self.store.read_bytes(MANIFEST))
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.store.uri(MANIFEST)}: not a {FORMAT} data set; re-run `omni data prep`")
        self.split, self.tasks, self.exclude_ids = split, tasks, exclude_ids or set()
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        self.seed, self.shuffle_buffer, self.epochs = seed, max(1, shuffle_buffer), epochs
        self.cache_bytes, self.num_workers = cache_bytes, num_workers
        # Items yielded by *this process's* iterators, or set by load_state_dict. With DataLoader
        # workers the iterating copies live in the workers, so this one never advances: see state_dict.
        self.position = 0
        self.processor: OmniProcessor | None = None
        self.batch_size, self.packing, self.max_seq_len = 1, False, 0
        where = runtime.ranks()
        self.rank, self.world_size = where.rank, where.world_size
        self._cache: OrderedDict[str, tuple[Encoded, int]] = OrderedDict()  # sha256 -> (sample, bytes)
        self._cached_bytes = 0

    # --- setup ---
    def configure(self, processor: OmniProcessor, batch_size: int = 1, packing: bool = False,
                  seed: int | None = None, rank: int | None = None, world_size: int | None = None) -> ShardStream:
        """Bind the processor and the loader's batch size (workers hand out whole batches). With
        `packing`, items are rows: lists of samples planned from their recorded token counts."""
        expected = self.manifest.get("encoding_fingerprint")
        if expected and expected != encoding_fingerprint(processor):
            raise StaleShardsError(
                f"{self.store.uri()} was tokenised with a different tokenizer or processor than this model "
                "uses (encoding fingerprints differ): re-run `omni data prep` with this model's config")
        self.processor, self.batch_size, self.packing = processor, batch_size, packing
        self.max_seq_len = processor.cfg.max_seq_len
        if seed is not None:
            self.seed = seed
        where = runtime.ranks()
        self.rank = where.rank if rank is None else rank
        self.world_size = where.world_size if world_size is None else world_size
        return self

    def state_dict(self) -> dict:
        """The position to resume from, as `{"items", "manifest_sha256", "split"}`.

        `items` is authoritative only when this object did the iterating (no DataLoader workers:
        `num_workers=0`). With workers, each worker iterates its own copy and this process's
        `items` stays at the last `load_state_dict` value (0 if none), so a caller must supply the
        consumed count itself, as `train_stage` does: `{**stream.state_dict(), "items": step *
        grad_accum * micro_batch_size}` (items handed to the model so far, counted on this rank).
        """
        return {"items": self.position, "manifest_sha256": self.manifest["sha256"], "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        if state.get("manifest_sha256", self.manifest["sha256"]) != self.manifest["sha256"]:
            raise ValueError("the saved position belongs to another data set (manifest hashes differ)")
        self.position = int(state["items"])

    # --- the plan: items of this rank, from the JSON index only ---
    def _wanted(self, sample: dict) -> bool:
        rec = sample["record"]
        return (self.tasks is None or rec["task"] in self.tasks) and rec["id"] not in self.exclude_ids

    def _read(self, shard: dict) -> list[dict]:
        data = self.store.read_bytes(shard["path"])
        if sha256(data) != shard["sha256"]:
            raise ValueError(f"{self.store.uri(shard['path'])}: sha256 does not match the manifest "
                             "(corrupt or replaced)")
        return [s for s in read_shard(data) if self._wanted(s)]

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        """This rank's samples for one epoch, shuffled (shard order + buffer), deterministic."""
        rng = random.Random(f"{self.seed}:{self.split}:{epoch}")
        shards = list(self.shards)
        rng.shuffle(shards)
        buffer: list[dict] = []
        index = 0

        def emit(sample: dict) -> Iterator[dict]:
            nonlocal index
            if index % self.world_size == self.rank:
                yield sample
            index += 1

        for shard in shards:
            for sample in self._read(shard):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                out, buffer[i] = buffer[i], sample
                yield from emit(out)
        rng.shuffle(buffer)
        for sample in buffer:
            yield from emit(sample)

    def _epoch_items(self, epoch: int) -> Iterator[list[dict]]:
        samples = self._epoch_samples(epoch)
        if not self.packing:
            yield from ([s] for s in samples)
            return
        # Rows from windows of samples: first-fit decreasing on the recorded token counts.
        window = max(64, 8 * self.batch_size)
        rng = random.Random(f"{self.seed}:{self.split}:{epoch}:rows")
        while chunk := [s for _, s in zip(range(window), samples, strict=False)]:
            bins = plan_bins([s["num_tokens"] for s in chunk], self.max_seq_len)
            rng.shuffle(bins)  # FFD emits long-first; keep batches mixed
            yield from ([chunk[i] for i in b] for b in bins)

    def plan(self) -> Iterator[list[dict]]:
        """Every item of this rank's stream from the start: lists of sample dicts (one sample
        each unless packing)."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            n = 0
            for item in self._epoch_items(epoch):
                n += 1
                yield item
            if n == 0:
                raise ValueError(
                    f"{self.store.uri()}: no {self.split} samples for tasks {self.tasks} on rank "
                    f"{self.rank} of {self.world_size}"
                )
            epoch += 1

    # --- encoding ---
    def _encode(self, sample: dict) -> Encoded:
        if sample["sha256"] in self._cache:
            self._cache.move_to_end(sample["sha256"])
            return self._cache[sample["sha256"]][0]
        record = Record.model_validate(sample["record"])
        encoded = self.processor.encode(to_chat_input(record, None, self.processor.cfg, fetch=self.store.read_bytes))
        if len(encoded.input_ids) != sample["num_tokens"]:
            raise StaleShardsError(
                f"record {record.id!r} encodes to {len(encoded.input_ids)} tokens, data prep recorded "
                f"{sample['num_tokens']}: the processor changed since prep; re-run `omni data prep`"
            )
        size = _encoded_bytes(encoded)
        if size <= self.cache_bytes:  # least recently used out until it fits
            self._cache[sample["sha256"]] = (encoded, size)
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1][1]
        return encoded

    def __iter__(self) -> Iterator[Encoded | list[Encoded]]:
        if self.processor is None:
            raise RuntimeError("call configure(processor, ...) before iterating")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start = self.position
        for j, item in enumerate(self.plan()):
            if j < start or ((j - start) // self.batch_size) % workers != worker:
                continue
            encoded = [self._encode(s) for s in item]
            self.position = j + 1
            yield encoded if self.packing else encoded[0]

    def num_samples(self) -> int:
        """Samples of the split that pass the task / id filters (all ranks together)."""
        return sum(len(self._read(shard)) for shard in self.shards)

    def records(self) -> Iterator[Record]:
        """Every record of the split once, in shard order (no shuffle, no rank split)."""
        for shard in self.shards:
            for sample in self._read(shard):
                yield Record.model_validate(sample["record"])
