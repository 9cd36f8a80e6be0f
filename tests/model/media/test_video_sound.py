"""A video's own sound read with its frames (`use_audio_in_video`) under the video's limits."""

from __future__ import annotations

import numpy as np
import pytest

from model.media.decode import MediaError, describe
from model.media.inputs import MediaReader, RawMedia
from model.media.limits import MediaLimits
from tests.model.media.sound import write_video_with_sound

SR = 16000


def _reader(cfg, on: bool = False, **limits) -> MediaReader:
    cfg = cfg.model_copy(update={"video": cfg.video.model_copy(update={"use_audio_in_video": on})})
    return MediaReader(cfg, MediaLimits("data", **limits))


def test_sound_is_read_on_the_frames_clock(tiny_cfg, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video_with_sound(path, seconds=4, loud_second=2)
    video = _reader(tiny_cfg).read(RawMedia("video", path, "'clip.mp4'", use_audio_in_video=True))
    assert video.times == [0.0, 1.0, 2.0, 3.0]
    assert video.audio.dtype == np.float32 and abs(video.audio.size / SR - 4.0) < 0.1
    energy = [float(np.abs(video.audio[s * SR + 1600 : (s + 1) * SR - 1600]).mean()) for s in range(4)]
    assert energy[2] > 0.2 and max(energy[:2] + energy[3:]) < 0.01, energy  # the tone, in its own second


def test_the_items_switch_overrides_the_models_default(tiny_cfg, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video_with_sound(path, seconds=2, loud_second=0)
    item = RawMedia("video", path.read_bytes(), "video[0]")
    assert _reader(tiny_cfg, on=False).read(item).audio is None
    assert _reader(tiny_cfg, on=True).read(item).audio is not None
    off = RawMedia("video", path, "video[0]", use_audio_in_video=False)
    assert _reader(tiny_cfg, on=True).read(off).audio is None
    sample = _reader(tiny_cfg, on=True).chat_input([{"role": "user", "content": "<video>"}], [item])
    assert len(sample.video_audios) == 1 and sample.video_audios[0].size > SR


def test_a_video_without_a_sound_track_is_frames_only(tiny_cfg, tmp_path):
    path = tmp_path / "silent.mp4"
    write_video_with_sound(path, seconds=2, sound=False)
    sample = _reader(tiny_cfg, on=True).chat_input([{"role": "user", "content": "<video>"}],
                                                   [RawMedia("video", path, "video[0]")])
    assert len(sample.videos[0]) == 2 and sample.video_audios == [None]


def test_the_videos_duration_limit_covers_its_sound(tiny_cfg, tmp_path):
    path = tmp_path / "long_sound.mp4"
    write_video_with_sound(path, seconds=2, sound_seconds=6, loud_second=0)
    reader = _reader(tiny_cfg, on=True, max_video_seconds=4)
    with pytest.raises(MediaError, match=r"^'a.mp4' has 6\.\d s of sound, over data.max_video_seconds=4") as err:
        reader.read(RawMedia("video", path, "'a.mp4'"))
    assert err.value.kind == "video too long"
    assert _reader(tiny_cfg, on=False, max_video_seconds=4).read(RawMedia("video", path, "'a.mp4'")).audio is None


def test_a_sound_track_under_the_rate_limit_is_refused(tiny_cfg, tmp_path):
    path = tmp_path / "clip.mp4"
    write_video_with_sound(path, seconds=1, loud_second=0)
    with pytest.raises(MediaError, match="has sound sampled at 44100 Hz, under data.min_audio_sample_rate") as err:
        _reader(tiny_cfg, on=True, min_audio_sample_rate=48000).read(RawMedia("video", path, "'a.mp4'"))
    assert err.value.kind == "audio sample rate"


def test_an_undecodable_sound_track_is_a_bad_video_audio(tiny_cfg, tmp_path, monkeypatch):
    import model.media.limits as limits

    def broken(src, rate):  # what the decoder raises for a corrupt track
        raise MediaError(f"{describe(src)}: corrupt audio (Invalid data found when processing input)")

    path = tmp_path / "clip.mp4"
    write_video_with_sound(path, seconds=1, loud_second=0)
    monkeypatch.setattr(limits, "load_audio", broken)
    with pytest.raises(MediaError, match="^video\\[0\\]: corrupt audio") as err:
        _reader(tiny_cfg, on=True).read(RawMedia("video", path, "video[0]"))
    assert err.value.kind == "bad video audio" and err.value.item == "video[0]"
