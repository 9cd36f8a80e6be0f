"""Raw media -> model input: the one place where media files or bytes become the `ChatInput` the
chat processor encodes.

    reader = MediaReader(model_cfg, MediaLimits.of("serving.limits", serving_cfg.limits))
    sample = reader.chat_input(messages, [RawMedia("image", png_bytes, "image[0]")])

Data prep (a record's media under the `data` limits), training (prepared records, checked by prep
already: no limits), evaluation (a benchmark's limits), the KServe predictor and the Triton entry
model (`serving.limits`, written into the exported repository) all read media through it. In order:

1. more items of a kind than the limits allow are refused before any is decoded;
2. each item is checked, from its header, to be the kind it is given as (a PNG named clip.mp4 is not
   a video) and within the limits;
3. it is decoded at the model's rates: frames at `video.fps`, at most `video.max_frames` (and the
   limits' `max_video_frames`), audio as mono at `audio.sampling_rate`.

A failure is a `MediaError` that names the item ("image[0] is 5000x5000 = 25000000 pixels, over
serving.limits.max_image_pixels=16777216"), the same words at every edge; each edge only maps it to
its own answer (quarantine, a failed benchmark row, a 400). Tiling and log-mel stay with the
processor: they are the encoders' input format, not the media's.

A new kind of input is one decoder in `MediaReader.decoders` and one list on `ChatInput`. A video's
own sound is read with its frames when `use_audio_in_video` is on for it (the item's
`RawMedia.use_audio_in_video`, from a record or a request; None: the model's
`video.use_audio_in_video`): the same source read once more with `read_video_sound`, under the video's
limits, onto `Video.audio` and `ChatInput.video_audios`; the processor interleaves it with the frames
by time. Streamed audio is the audio decoder applied to chunks as they arrive.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model.config import ModelConfig
from model.media.decode import MediaError, Source, describe
from model.media.limits import (
    LimitExceeded,
    MediaLimits,
    Video,
    read_audio,
    read_image,
    read_video,
    read_video_sound,
)
from model.media.tags import MEDIA_KINDS


@dataclass
class ChatInput:
    """A conversation to answer: `messages` may contain <image>/<video>/<audio> tags matching the lists."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)
    video_times: list[list[float]] = field(default_factory=list)  # per video, frame times in s; default i / fps
    # Per video, its sound track (mono at audio.sampling_rate, on the frames' clock) or None: frames only.
    # Empty: no video has sound.
    video_audios: list[np.ndarray | None] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)

    def add(self, kind: str, decoded: Image.Image | Video | np.ndarray) -> None:
        """Append one decoded item (what `MediaReader.read` returns for `kind`)."""
        if kind == "video":
            # Videos put on the list directly, without a sound list, are frames only.
            self.video_audios += [None] * (len(self.videos) - len(self.video_audios))
            self.videos.append(decoded.frames)
            self.video_times.append(decoded.times)
            self.video_audios.append(decoded.audio)
        else:
            getattr(self, kind + "s").append(decoded)


@dataclass(frozen=True)
class RawMedia:
    kind: str  # one of MEDIA_KINDS: what the caller gives the item as
    data: Source  # a path or the file's bytes
    name: str  # what a refusal calls it: a request field ("image[0]"), a record's path ("'a.png'")
    use_audio_in_video: bool | None = None  # a video's: read its sound too; None: the model's default


def use_audio_in_video(own: bool | None, cfg: ModelConfig) -> bool:
    """The switch for a video's sound: a record's or request's own setting, else the model's default."""
    return own if own is not None else cfg.video.use_audio_in_video


def named(err: MediaError, item: RawMedia) -> MediaError:
    """The same error in the item's own name: the name, then what is wrong, without the decoder's
    name for the source (its path, or "<123 bytes>") or FFmpeg's "[Errno N]" noise. A limit's
    message continues the name ("is 4.0 s, over ..."); any other follows a colon."""
    detail = re.sub(r"\[Errno -?\d+\] ", "", str(err)).removeprefix(f"{describe(item.data)}: ")
    out = type(err)(f"{item.name}{' ' if isinstance(err, LimitExceeded) else ': '}{detail}", err.kind)
    out.item = item.name
    return out


class MediaReader:
    """Raw media + limits + the model config in; decoded, checked model input out (or MediaError)."""

    def __init__(self, cfg: ModelConfig, limits: MediaLimits):
        self.cfg, self.limits = cfg, limits
        cap = limits.max_video_frames
        self.max_frames = min(cfg.video.max_frames, cap) if cap is not None else cfg.video.max_frames
        self.decoders: dict[str, Callable[[Source], object]] = {
            "image": lambda src: read_image(src, limits),
            "video": lambda src: read_video(src, limits, cfg.video.fps, self.max_frames),
            "audio": lambda src: read_audio(src, limits, cfg.audio.sampling_rate),
        }

    def check_counts(self, items: Sequence[RawMedia]) -> None:
        """Refuse more items of a kind than `max_images` / `max_videos` / `max_audios`, decoding none."""
        for kind in MEDIA_KINDS:
            cap = getattr(self.limits, f"max_{kind}s")
            same = [m for m in items if m.kind == kind]
            if cap is not None and len(same) > cap:
                err = LimitExceeded(f"{same[cap].name}: {len(same)} {kind}s in one conversation; the limit is "
                                    f"{cap} ({self.limits.source}.max_{kind}s)", f"too many {kind}s")
                err.item = same[cap].name
                raise err

    def read(self, item: RawMedia) -> Image.Image | Video | np.ndarray:
        """One item decoded: an RGB image, a `Video` (frames and their times), or mono float32 audio."""
        if item.kind not in self.decoders:
            raise MediaError(f"{item.name}: unknown media kind {item.kind!r}; expected one of "
                             f"{', '.join(self.decoders)}", "unknown media kind")
        try:
            decoded = self.decoders[item.kind](item.data)
            if self.with_sound(item):
                sound = read_video_sound(item.data, self.limits, self.cfg.audio.sampling_rate)
                decoded = dataclasses.replace(decoded, audio=sound)
            return decoded
        except MediaError as err:
            raise named(err, item) from None

    def with_sound(self, item: RawMedia) -> bool:
        """Whether a video item is read with its sound."""
        return item.kind == "video" and use_audio_in_video(item.use_audio_in_video, self.cfg)

    def chat_input(self, messages: list[dict], items: Sequence[RawMedia]) -> ChatInput:
        """The conversation with its media decoded, in the order given (per kind, the n-th item fills
        the n-th tag of that kind)."""
        self.check_counts(items)
        sample = ChatInput(messages=messages)
        for item in items:
            sample.add(item.kind, self.read(item))
        return sample
