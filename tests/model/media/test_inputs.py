"""The one owner of media -> model input: counts refused before decoding, the kind checked from the
file itself, limits named in the item's own words, and decoding at the model's rates."""

from __future__ import annotations

import io
import math
import wave

import numpy as np
import pytest
from PIL import Image

from model.media.decode import MediaError
from model.media.inputs import ChatInput, MediaReader, RawMedia
from model.media.limits import LimitExceeded, MediaLimits
from tests.model.media.sound import mp4_bytes


def _mp4(seconds: int) -> bytes:
    return mp4_bytes(seconds, fps=2, side=16, step=10)


def _png(width: int = 32, height: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(int(rate * seconds)) / rate
        w.writeframes((0.3 * np.sin(2 * math.pi * 300 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


SERVING = MediaLimits("serving.limits", max_image_pixels=40 * 40, max_video_seconds=3.0, max_video_frames=2,
                      max_images=1)


def test_a_conversation_is_decoded_at_the_models_rates(tiny_cfg):
    reader = MediaReader(tiny_cfg, MediaLimits("test"))
    sample = reader.chat_input([{"role": "user", "content": "<image><video><audio>?"}],
                               [RawMedia("audio", _wav(0.5), "a"), RawMedia("image", _png(), "i"),
                                RawMedia("video", _mp4(3), "v")])
    assert isinstance(sample, ChatInput) and sample.images[0].size == (32, 32)
    assert len(sample.videos[0]) == len(sample.video_times[0]) == min(3 * tiny_cfg.video.fps, tiny_cfg.video.max_frames)
    assert sample.audios[0].dtype == np.float32
    assert sample.audios[0].size == pytest.approx(0.5 * tiny_cfg.audio.sampling_rate, abs=64)  # resampled from 8 kHz


def test_the_limits_cap_the_sampled_frames_below_the_model(tiny_cfg):
    video = MediaReader(tiny_cfg, SERVING).read(RawMedia("video", _mp4(3), "video[0]"))
    assert len(video.frames) == 2 and video.times[-1] > 1.0  # spread over the clip, not its first second


@pytest.mark.parametrize(("item", "reason"), [
    (RawMedia("image", _png(41, 40), "image[0]"),
     "image[0] is 41x40 = 1640 pixels, over serving.limits.max_image_pixels=1600"),
    (RawMedia("video", _mp4(4), "video[0]"), "video[0] is 4.0 s, over serving.limits.max_video_seconds=3.0"),
], ids=["image over the pixels", "video too long"])
def test_a_limit_is_refused_in_the_items_own_name(tiny_cfg, item, reason):
    with pytest.raises(LimitExceeded) as err:
        MediaReader(tiny_cfg, SERVING).read(item)
    assert str(err.value) == reason and err.value.item == item.name


def test_too_many_items_are_refused_before_any_is_decoded(tiny_cfg):
    items = [RawMedia("image", _png(), "image[0]"), RawMedia("image", b"never decoded", "image[1]")]
    with pytest.raises(LimitExceeded, match=r"^image\[1\]: 2 images in one conversation; the limit is 1 "
                                            r"\(serving.limits.max_images\)$") as err:
        MediaReader(tiny_cfg, SERVING).chat_input([{"role": "user", "content": "<image><image>"}], items)
    assert err.value.item == "image[1]" and err.value.kind == "too many images"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_picture_given_as_a_video_is_refused_whatever_its_name(tiny_cfg, tmp_path, fmt):
    path = tmp_path / "clip.mp4"
    Image.new("RGB", (32, 32), "green").save(path, format=fmt)
    reader = MediaReader(tiny_cfg, MediaLimits("data"))
    for src in (path, path.read_bytes()):
        with pytest.raises(MediaError, match=r"^'clip.mp4': a still \w+ image, not a video$") as err:
            reader.read(RawMedia("video", src, "'clip.mp4'"))
        assert err.value.kind == "bad video"
    assert reader.read(RawMedia("image", path, "'clip.mp4'")).size == (32, 32)  # as an image it is fine


def test_an_undecodable_item_names_itself_without_the_byte_count(tiny_cfg):
    with pytest.raises(MediaError) as err:
        MediaReader(tiny_cfg, SERVING).read(RawMedia("image", b"not an image", "image[0]"))
    assert str(err.value) == "image[0]: not a recognised image format" and err.value.kind == "bad image"


def test_limits_read_a_config_section_by_name_and_travel_as_json():
    section = {"max_image_pixels": 100, "max_video_seconds": None, "max_images": 2, "max_request_bytes": 9}
    limits = MediaLimits.of("serving.limits", section)
    assert limits.max_image_pixels == 100 and limits.max_video_seconds == math.inf and limits.max_images == 2
    assert MediaLimits.from_json(limits.to_json()) == limits
    assert MediaLimits.from_json(MediaLimits("data").to_json()) == MediaLimits("data")  # no limits: nulls in JSON
