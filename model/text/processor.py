"""Turns a conversation with media into model inputs: token ids with placeholder runs, labels on
assistant turns only, and the pixel / mel tensors that fill the placeholders.

The conversation is rendered with the tokenizer's own chat template (ChatML for the tokenizers
trained here; a checkpoint's template, default system prompt included, otherwise). Each message's
content goes through the template as a sentinel, so template markup is tokenised with its special
tokens while typed text never is, and media tags are expanded inside the rendered text. An
assistant span is found by character offsets: the conversation up to that turn rendered with the
generation prompt, and up to its end without; the span in between (trailing whitespace aside) is
labelled. A template that renders earlier turns differently from the last (no stable prefix)
cannot be labelled and fails clearly.

A `<image>` tag becomes `<img_start>` ... `<img_end>` around exactly as many `<img_pad>` as the vision
projector emits: one tile's worth for a small image; for an AnyRes grid, the thumbnail, then each row
of tiles (tiles joined by `<img_tile_sep>`, rows led by `<img_row_sep>`). `<video>` becomes each
frame's time as text ("3s", unless `video.timestamps` is off) and its placeholders; `<audio>` becomes
encoder frames / 2 / projector stride placeholders, summed over 30 s windows.

A video with its sound (`ChatInput.video_audios`) is interleaved by time: after each frame's
placeholders, `<audio_start>` + the placeholders of the sound from that frame's time to the next
frame's (the last frame: to the end) + `<audio_end>`. The sound is encoded whole, as a standalone
clip is (log-mel over the track, 30 s Whisper windows), and its audio tokens are dealt out by the
time each one starts (token j of a window starts at mel frame j * 2 * projector_stride): the model
splices audio embeddings in token order, so each frame's share gets exactly its own span's encoder
outputs, and the counts add up to what the encoder emits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor

from model.config import ModelConfig
from model.media.anyres import tile_image
from model.media.inputs import ChatInput
from model.media.tags import TAG_PATTERN
from model.text.tokenizer import IMG_ROW_SEP, IMG_TILE_SEP, MEDIA_SPECIAL

IGNORE_INDEX = -100
SENTINEL = re.compile("\ue000(\\d+)\ue001")  # a message's content while the template renders
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


class OmniProcessor:
    def __init__(self, tokenizer, cfg: ModelConfig):
        self.tok, self.cfg = tokenizer, cfg
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
        """Tokenise a conversation with the chat template. Labels are the assistant turns (+ their end
        markup), -100 elsewhere. With `add_generation_prompt`, the template's open assistant turn is
        appended (for generation)."""
        out = Encoded(input_ids=[], labels=[])
        if sample.video_times and len(sample.video_times) != len(sample.videos):
            raise ValueError(f"{len(sample.videos)} videos but {len(sample.video_times)} lists of frame times")
        if sample.video_audios and len(sample.video_audios) != len(sample.videos):
            raise ValueError(f"{len(sample.videos)} videos but {len(sample.video_audios)} video sound tracks")
        times = sample.video_times or [None] * len(sample.videos)
        sounds = sample.video_audios or [None] * len(sample.videos)
        queues = {
            "image": list(sample.images),
            "video": list(zip(sample.videos, times, sounds, strict=True)),
            "audio": list(sample.audios),
        }
        for text, message, train_on in self.render(sample.messages, add_generation_prompt):
            if message is None:  # template markup: its special tokens are real
                self._add(out, self.tok.encode(text, add_special_tokens=False), train_on)
                continue
            for i, piece in enumerate(TAG_PATTERN.split(sample.messages[message]["content"])):
                if i % 2 == 0:
                    if piece:
                        # Split special tokens: typed "<img_pad>" or "<|im_end|>" stays text, so a user
                        # can neither fake a turn boundary nor break the placeholder count.
                        ids = self.tok.encode(piece, add_special_tokens=False, split_special_tokens=True)
                        self._add(out, ids, train_on)
                    continue
                if not queues[piece]:
                    raise ValueError(f"more <{piece}> tags than {piece}s supplied")
                self._add(out, self._media(piece, queues[piece].pop(0), out), False)
        leftover = {k: len(v) for k, v in queues.items() if v}
        if leftover:
            raise ValueError(f"media without a tag in the text: {leftover}")
        return out

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # noqa: BLE001 - jinja's own errors (raise_exception, undefined) say little alone
            raise ValueError(f"the tokenizer's chat template cannot render this conversation "
                             f"(roles {[m['role'] for m in messages]}): {err}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, int | None, bool]]:
        """The conversation through the chat template as (text, message index or None for markup,
        labelled) pieces, in order."""
        blank = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        full = self._template(blank, add_generation_prompt)
        spans = []
        for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            before, through = self._template(blank[:i], True), self._template(blank[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError(f"cannot find assistant turn {i} in the chat template's output: the template "
                                 "renders a conversation's earlier turns differently from its last one, so the "
                                 "labels cannot be placed; give the tokenizer a template with stable prefixes")
            spans.append((len(before), len(through.rstrip())))
        found = [int(m.group(1)) for m in SENTINEL.finditer(full)]
        if found != list(range(len(messages))):
            raise ValueError("the chat template does not render every message's content once, in order; "
                             "it cannot be used for training")
        cuts = sorted({0, len(full), *(x for span in spans for x in span),
                       *(x for m in SENTINEL.finditer(full) for x in m.span())})
        pieces = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            labelled = any(s <= a and b <= e for s, e in spans)
            match = SENTINEL.fullmatch(full, a, b)
            pieces.append((full[a:b], int(match.group(1)) if match else None, labelled))
        return pieces

    def _media(self, kind: str, item, out: Encoded) -> list[int]:
        start, pad, end = self.media_ids[kind]
        if kind == "image":
            grid, tiles = tile_image(item, self.cfg.vision.image_size, self.cfg.vision.anyres_grids)
            out.pixel_values.extend(self.pixels(t) for t in tiles)
            return [start, *self.image_layout(grid), end]
        if kind == "video":
            return self._video(*item, out)
        windows = self.audio_windows(np.asarray(item, dtype=np.float32))
        out.audio_mel.extend(windows)
        return [start] + [pad] * self.audio_tokens(windows) + [end]

    def _video(self, frames: list[Image.Image], times: list[float] | None, sound: np.ndarray | None,
               out: Encoded) -> list[int]:
        """A video's run: per frame, its time, its placeholders, then (with sound) its span's audio."""
        start, pad, end = self.media_ids["video"]
        if not frames:
            raise ValueError("video has no frames")
        if times is not None and len(times) != len(frames):
            raise ValueError(f"video has {len(frames)} frames but {len(times)} frame times")
        times = times if times is not None else [i / self.cfg.video.fps for i in range(len(frames))]
        out.video_pixel_values.extend(self.pixels(f) for f in frames)
        heard = self.sound_per_frame(sound, times, out) if sound is not None else [0] * len(frames)
        a_start, a_pad, a_end = self.media_ids["audio"]
        ids = [start]
        for t, n_audio in zip(times, heard, strict=True):
            if self.cfg.video.timestamps:
                ids += self.tok.encode(f"{round(t, 1):g}s")
            ids += [pad] * self.frame_tokens
            if n_audio:
                ids += [a_start] + [a_pad] * n_audio + [a_end]
        return ids + [end]

    def sound_per_frame(self, sound: np.ndarray, times: list[float], out: Encoded) -> list[int]:
        """Encode a video's sound track (its windows appended to `out.audio_mel`) and return how many
        of its audio tokens start in each frame's span [times[i], times[i + 1]); sound before the first
        frame goes with it. A track shorter than one audio token adds nothing."""
        sound = np.asarray(sound, dtype=np.float32)
        if sound.size < self.audio_multiple * self.mel.hop_length:
            return [0] * len(times)
        windows = self.audio_windows(sound)
        out.audio_mel.extend(windows)
        starts = np.concatenate([i * self.window_frames + np.arange(0, w.shape[1], self.audio_multiple)
                                 for i, w in enumerate(windows)])
        seconds = starts * self.mel.hop_length / self.cfg.audio.sampling_rate
        span = np.searchsorted(np.asarray(times[1:], dtype=np.float64), seconds, side="right")
        return np.bincount(span, minlength=len(times)).tolist()

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
