"""Reading prepared records (JSONL + media) into encoded training samples."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from torch.utils.data import Dataset

from model.config import ModelConfig
from model.media import load_audio, load_image, load_video_frames
from model.processor import ChatInput, Encoded, OmniProcessor
from model.records import Record


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSONL file (already validated by data prep, so errors here are bugs)."""
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]


def resolve(uri: str, base_dir: Path) -> str | Path:
    if uri.startswith("s3://") or Path(uri).is_absolute():
        return uri
    return base_dir / uri


def to_chat_input(record: Record, base_dir: Path, cfg: ModelConfig, include_answer: bool = True) -> ChatInput:
    """Load a record's media (paths relative to `base_dir`) into a ChatInput.
    Without the answer, the conversation stops before the last assistant turn (for generation)."""
    messages = record.messages if include_answer else record.prompt_messages
    sample = ChatInput(messages=[m.model_dump() for m in messages])
    used = {k: sum(m.content.count(f"<{k}>") for m in messages) for k in ("image", "video", "audio")}
    for uri in record.images[: used["image"]]:
        sample.images.append(load_image(resolve(uri, base_dir)))
    for uri in record.videos[: used["video"]]:
        frames, _ = load_video_frames(resolve(uri, base_dir), cfg.video.fps, cfg.video.max_frames)
        sample.videos.append(frames)
    for uri in record.audios[: used["audio"]]:
        sample.audios.append(load_audio(resolve(uri, base_dir), cfg.audio.sampling_rate))
    return sample


class EncodedDataset(Dataset):
    """Records of the given tasks, decoded and tokenised once up front (the demo set is small;
    streaming shards replace this for real corpora)."""

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
