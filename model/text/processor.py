"""Turns a conversation with media into model inputs: token ids with placeholder runs, labels on
assistant turns only, and the pixel / mel tensors that fill the placeholders.

A `<image>` tag becomes `<img_start>` ... `<img_end>` around exactly as many `<img_pad>` as the vision
projector emits: one tile's worth for a small image; for an AnyRes grid, the thumbnail, then each row
of tiles (tiles joined by `<img_tile_sep>`, rows led by `<img_row_sep>`). `<video>` becomes each
frame's time as text ("3s", unless `video.timestamps` is off) and its placeholders; `<audio>` becomes
encoder frames / 2 / projector stride placeholders, summed over 30 s windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor

from model.config import ModelConfig
from model.media.anyres import tile_image
from model.media.tags import TAG_PATTERN
from model.text.tokenizer import IM_END, IM_START, IMG_ROW_SEP, IMG_TILE_SEP, MEDIA_SPECIAL

IGNORE_INDEX = -100
# SigLIP normalisation.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


@dataclass
class Encoded:
    """One sample, ready for collation."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one (3, H, W) per image tile
    video_pixel_values: list[torch.Tensor] = field(default_factory=list)  # one (3, H, W) per frame
    audio_mel: list[torch.Tensor] = field(default_factory=list)  # one (bins, T) per 30 s window


@dataclass
class ChatInput:
    """A conversation to answer: `messages` may contain <image>/<video>/<audio> tags matching the lists."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)
    video_times: list[list[float]] = field(default_factory=list)  # per video, frame times in s; default i / fps
    audios: list[np.ndarray] = field(default_factory=list)


class OmniProcessor:
    def __init__(self, tokenizer, cfg: ModelConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END)}
        self.media_ids = {
            k: [tokenizer.convert_tokens_to_ids(t) for t in triple] for k, triple in MEDIA_SPECIAL.items()
        }
        self.mel = WhisperFeatureExtractor(feature_size=cfg.audio.num_mel_bins, sampling_rate=cfg.audio.sampling_rate)
        self.layout_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMG_TILE_SEP, IMG_ROW_SEP)}
        self.tile_tokens = cfg.vision.tokens_per_tile
        self.frame_tokens = cfg.vision.tokens_per_frame
        # Mel frames per 30 s window (3000 for Whisper): longer audio is split into windows.
        self.window_frames = 2 * cfg.audio.max_source_positions
        self.audio_multiple = 2 * cfg.audio.projector_stride  # mel frames per audio token

    @property
    def placeholder_ids(self) -> dict[str, int]:
        return {k: ids[1] for k, ids in self.media_ids.items()}

    # --- media -> tensors ---
    def pixels(self, image: Image.Image) -> torch.Tensor:
        size = self.cfg.vision.image_size
        arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        return torch.from_numpy((arr - PIXEL_MEAN) / PIXEL_STD).permute(2, 0, 1)

    def audio_windows(self, wave: np.ndarray) -> list[torch.Tensor]:
        """Log-mel of the whole clip (no 30 s padding), cut into encoder windows, each trimmed to a
        whole number of audio tokens."""
        if wave.size / self.cfg.audio.sampling_rate > self.cfg.audio.max_seconds * 8:
            raise ValueError("audio is too long for this model's configured limits")
        mel = self.mel(
            wave, sampling_rate=self.cfg.audio.sampling_rate, return_tensors="np", padding=False, truncation=False
        )
        mel = torch.from_numpy(mel["input_features"][0])
        windows = []
        for start in range(0, mel.shape[1], self.window_frames):
            chunk = mel[:, start : start + self.window_frames]
            keep = chunk.shape[1] - chunk.shape[1] % self.audio_multiple
            if keep:
                windows.append(chunk[:, :keep])
        if not windows:
            raise ValueError(f"audio too short: needs at least {self.audio_multiple * 10} ms")
        return windows

    def audio_tokens(self, windows: list[torch.Tensor]) -> int:
        return sum(w.shape[1] // self.audio_multiple for w in windows)

    # --- conversation -> ids ---
    def encode(self, sample: ChatInput, add_generation_prompt: bool = False) -> Encoded:
        """Tokenise a conversation. Labels are the assistant turns (+ their end token), -100 elsewhere.
        With `add_generation_prompt`, an open assistant turn is appended (for generation)."""
        out = Encoded(input_ids=[], labels=[])
        if sample.video_times and len(sample.video_times) != len(sample.videos):
            raise ValueError(f"{len(sample.videos)} videos but {len(sample.video_times)} lists of frame times")
        times = sample.video_times or [None] * len(sample.videos)
        queues = {
            "image": list(sample.images),
            "video": list(zip(sample.videos, times, strict=True)),
            "audio": list(sample.audios),
        }
        for msg in sample.messages:
            train_on = msg["role"] == "assistant"
            self._add(out, [self.ids[IM_START]] + self.tok.encode(msg["role"] + "\n"), False)
            for i, piece in enumerate(TAG_PATTERN.split(msg["content"])):
                if i % 2 == 0:
                    if piece:
                        # Split special tokens: typed "<img_pad>" or "<|im_end|>" stays text, so a user
                        # can neither fake a turn boundary nor break the placeholder count.
                        self._add(out, self.tok.encode(piece, split_special_tokens=True), train_on)
                    continue
                if not queues[piece]:
                    raise ValueError(f"more <{piece}> tags than {piece}s supplied")
                self._add(out, self._media(piece, queues[piece].pop(0), out), False)
            self._add(out, [self.ids[IM_END]], train_on)
            self._add(out, self.tok.encode("\n"), False)
        leftover = {k: len(v) for k, v in queues.items() if v}
        if leftover:
            raise ValueError(f"media without a tag in the text: {leftover}")
        if add_generation_prompt:
            self._add(out, [self.ids[IM_START]] + self.tok.encode("assistant\n"), False)
        return out

    def _media(self, kind: str, item, out: Encoded) -> list[int]:
        start, pad, end = self.media_ids[kind]
        if kind == "image":
            grid, tiles = tile_image(item, self.cfg.vision.image_size, self.cfg.vision.anyres_grids)
            out.pixel_values.extend(self.pixels(t) for t in tiles)
            return [start, *self.image_layout(grid), end]
        if kind == "video":
            frames, times = item
            if not frames:
                raise ValueError("video has no frames")
            if times is not None and len(times) != len(frames):
                raise ValueError(f"video has {len(frames)} frames but {len(times)} frame times")
            times = times if times is not None else [i / self.cfg.video.fps for i in range(len(frames))]
            out.video_pixel_values.extend(self.pixels(f) for f in frames)
            ids = [start]
            for t in times:
                if self.cfg.video.timestamps:
                    ids += self.tok.encode(f"{round(t, 1):g}s")
                ids += [pad] * self.frame_tokens
            return ids + [end]
        windows = self.audio_windows(np.asarray(item, dtype=np.float32))
        out.audio_mel.extend(windows)
        return [start] + [pad] * self.audio_tokens(windows) + [end]

    def image_layout(self, grid: tuple[int, int]) -> list[int]:
        """Placeholder run for one image tiled as `grid` (columns, rows), without start/end."""
        tile = [self.media_ids["image"][1]] * self.tile_tokens
        cols, rows = grid
        if (cols, rows) == (1, 1):
            return tile
        ids = list(tile)  # the thumbnail
        for _ in range(rows):
            ids.append(self.layout_ids[IMG_ROW_SEP])
            for c in range(cols):
                ids += ([self.layout_ids[IMG_TILE_SEP]] if c else []) + tile
        return ids

    @staticmethod
    def _add(out: Encoded, ids: list[int], train_on: bool) -> None:
        out.input_ids.extend(ids)
        out.labels.extend(ids if train_on else [IGNORE_INDEX] * len(ids))

    # --- batch ---
    def collate(self, samples: list[Encoded], left_pad: bool = False) -> dict[str, torch.Tensor]:
        """Pad to the longest sample (right for training, left for generation) and stack media."""
        width = max(len(s.input_ids) for s in samples)
        pad_id = self.tok.pad_token_id
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            sl = slice(width - n, width) if left_pad else slice(0, n)
            ids[i, sl] = torch.tensor(s.input_ids)
            labels[i, sl] = torch.tensor(s.labels)
            mask[i, sl] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        images = [p for s in samples for p in s.pixel_values]
        frames = [p for s in samples for p in s.video_pixel_values]
        windows = [w for s in samples for w in s.audio_mel]
        if images:
            batch["pixel_values"] = torch.stack(images)
        if frames:
            batch["video_pixel_values"] = torch.stack(frames)
        if windows:
            longest = max(w.shape[1] for w in windows)
            mel = torch.zeros((len(windows), windows[0].shape[0], longest))  # zeros: as conv padding sees
            for i, w in enumerate(windows):
                mel[i, :, : w.shape[1]] = w
            batch["audio_mel"] = mel
            batch["audio_frames"] = torch.tensor([w.shape[1] for w in windows])
        return batch
