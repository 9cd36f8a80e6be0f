"""Reading prepared records (JSONL + media) into encoded training samples."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from torch.utils.data import Dataset

from model.config import ModelConfig
from model.data.records import Record
from model.media.decode import Source
from model.media.inputs import ChatInput, MediaReader, RawMedia
from model.media.limits import MediaLimits
from model.media.tags import MEDIA_KINDS
from model.text.processor import Encoded, OmniProcessor


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSONL file (already validated by data prep, so errors here are bugs)."""
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]


def resolve(uri: str, base_dir: Path) -> str | Path:
    if uri.startswith("s3://") or Path(uri).is_absolute():
        return uri
    return base_dir / uri


# Prepared media passed the data limits and the kind check in prep (`model.data.normalise`).
PREPARED = MediaLimits(source="prepared data")


def to_chat_input(record: Record, base_dir: Path | None, cfg: ModelConfig, include_answer: bool = True,
                  fetch: Callable[[str], Source] | None = None) -> ChatInput:
    """Load a record's media (paths relative to `base_dir`) into a ChatInput.
    Without the answer, the conversation stops before the last assistant turn (for generation)."""
    # `fetch(uri)` gives a path or the bytes (e.g. from object storage: the shard reader).
    get = fetch or (lambda uri: resolve(uri, base_dir))
    messages = record.messages if include_answer else record.prompt_messages
    used = {k: sum(m.content.count(f"<{k}>") for m in messages) for k in MEDIA_KINDS}
    media = [RawMedia(kind, get(uri), repr(uri), record.use_audio_in_video) for kind in MEDIA_KINDS
             for uri in getattr(record, kind + "s")[: used[kind]]]
    return MediaReader(cfg, PREPARED).chat_input([m.model_dump() for m in messages], media)


class EncodedDataset(Dataset):
    """Records of the given tasks, decoded and tokenised once up front: for small in-memory sets
    and tests. Training on prepared data streams shards instead (`model.data.shards.ShardStream`)."""

    def __init__(self, records: Iterable[Record], base_dir: Path, processor: OmniProcessor, tasks: list[str] | None):
        self.samples: list[Encoded] = []
        for r in records:
            if tasks is None or r.task in tasks:
                encoded = processor.encode(to_chat_input(r, base_dir, processor.cfg))
                if len(encoded.input_ids) > processor.cfg.max_seq_len:
                    raise ValueError(f"record {r.id}: {len(encoded.input_ids)} tokens > max_seq_len "
                                     f"{processor.cfg.max_seq_len}; data prep should have quarantined it")
                self.samples.append(encoded)
        if not self.samples:
            raise ValueError(f"no records for tasks {tasks}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Encoded:
        return self.samples[i]
