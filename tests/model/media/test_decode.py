"""Decoding and normalisation of real media files written here with Pillow, PyAV and `wave`."""

from __future__ import annotations

import io
import math
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from model.media.decode import (
    MediaError,
    load_audio,
    load_image,
    load_video_frames,
    media_duration,
    sample_times,
)

# ---------------------------------------------------------------------------------------- helpers


def _pattern(size: int = 32) -> Image.Image:
    """A colourful image whose pixels differ everywhere, so a wrong decode cannot pass."""
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 7 % 256, y * 5 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write_video(path: Path, seconds: int = 5, fps: int = 10, gop: int | None = None) -> None:
    """Lossless H.264 where frame i is a flat grey of level 4*i: a decoded frame tells its index."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"qp": "0", "preset": "ultrafast"})
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = gop or fps  # several keyframes, so seeks land in different GOPs
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            c.mux(s.encode(frame))
        c.mux(s.encode())


def _frame_index(img: Image.Image) -> int:
    return round(float(np.asarray(img).mean()) / 4)


def _write_wav(
    path: Path, rate: int = 22050, seconds: float = 1.0, channels: int = 2, freq: float = 440.0
) -> None:
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.5 * np.sin(2 * math.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())


# ----------------------------------------------------------------------------------------- images


def test_png_round_trip_is_exact_from_path_and_bytes(tmp_path):
    img = _pattern()
    path = tmp_path / "a.png"
    img.save(path)
    for src in (path, str(path), path.read_bytes()):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == img.size
        assert np.array_equal(np.asarray(out), np.asarray(img))


def test_jpeg_round_trip_is_close():
    img = _pattern()
    out = load_image(_encode(img, "JPEG", quality=95))
    assert out.mode == "RGB" and out.size == img.size
    assert np.abs(np.asarray(out, np.int16) - np.asarray(img, np.int16)).mean() < 8


def test_grayscale_and_transparent_images_become_rgb():
    gray = load_image(_encode(Image.new("L", (8, 8), 100), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    # Fully transparent pixels are put on white, not on whatever colour the RGB channels hold.
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(_encode(rgba, "PNG")).getpixel((3, 3)) == (255, 255, 255)


def test_truncated_jpeg_is_rejected():
    data = _encode(_pattern(64), "JPEG", quality=95)
    with pytest.raises(MediaError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])


def test_empty_inputs_are_rejected(tmp_path):
    with pytest.raises(MediaError, match="0 bytes"):
        load_image(b"")
    empty = tmp_path / "empty.png"
    empty.touch()
    for loader in (load_image, load_audio, lambda p: load_video_frames(p, 1.0, 4)):
        with pytest.raises(MediaError, match="0 bytes"):
            loader(empty)


def test_text_named_png_and_missing_file_are_rejected(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image\n")
    with pytest.raises(MediaError, match="not a recognised image"):
        load_image(fake)
    with pytest.raises(MediaError, match="no such file"):
        load_image(tmp_path / "missing.png")
    assert issubclass(MediaError, ValueError)


# ----------------------------------------------------------------------------------------- videos


def test_video_sampled_at_one_fps_by_seeking(tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, seconds=5, fps=10)
    frames, times = load_video_frames(path, fps=1.0, max_frames=48)
    assert times == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
    assert [_frame_index(f) for f in frames] == [0, 10, 20, 30, 40]
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)


def test_video_fractional_fps_and_bytes_input(tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, seconds=5, fps=10)
    frames, times = load_video_frames(path.read_bytes(), fps=3.0, max_frames=100)
    assert len(frames) == 15
    # Each sample is the first frame at or after its target time k/3.
    assert [_frame_index(f) for f in frames] == [math.ceil(k * 10 / 3 - 1e-9) for k in range(15)]
    assert all(a < b for a, b in zip(times, times[1:], strict=False))


@pytest.mark.parametrize("gop", [3, 45])
@pytest.mark.parametrize(("video_fps", "sample_fps"), [(10, 1.0), (10, 3.0), (10, 0.4), (2, 3.0)])
def test_seek_or_decode_forward_gives_the_first_frame_at_each_target(tmp_path, gop, video_fps, sample_fps):
    """Keyframes sparser than the samples (gop 45 = 4.5 s at 10 fps: decoding forward) and denser
    (gop 3: seeking), and a video slower than the sampling (one frame serves two targets)."""
    path = tmp_path / "v.mp4"
    _write_video(path, seconds=6, fps=video_fps, gop=gop)
    frames, times = load_video_frames(path, fps=sample_fps, max_frames=100)
    targets = sample_times(6.0, sample_fps, 100)
    expected = [min(math.ceil(t * video_fps - 1e-6), 6 * video_fps - 1) for t in targets]
    assert [_frame_index(f) for f in frames] == expected
    assert times == pytest.approx([i / video_fps for i in expected])


def test_long_video_is_capped_and_spread_over_the_whole_duration(tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, seconds=5, fps=10)
    frames, times = load_video_frames(path, fps=2.0, max_frames=4)
    assert len(frames) == len(times) == 4
    assert all(a < b for a, b in zip(times, times[1:], strict=False))
    assert times[0] == 0.0 and times[-1] >= 3.5  # reaches into the last quarter, not just 0..1.5 s
    assert [_frame_index(f) for f in frames] == [round(t * 10) for t in times]


def test_sample_times():
    assert sample_times(4.0, 1.0, 48) == [0.0, 1.0, 2.0, 3.0]
    assert sample_times(0.2, 1.0, 48) == [0.0]  # very short clip: still one frame
    assert sample_times(100.0, 1.0, 4) == [0.0, 25.0, 50.0, 75.0]


def test_video_errors(tmp_path):
    wav = tmp_path / "a.wav"
    _write_wav(wav)
    with pytest.raises(MediaError, match="no video stream"):
        load_video_frames(wav, 1.0, 4)
    with pytest.raises(MediaError, match="cannot open"):
        load_video_frames(b"definitely not a video", 1.0, 4)


# ------------------------------------------------------------------------------------------ audio


def test_wav_is_resampled_to_16k_mono_float(tmp_path):
    path = tmp_path / "a.wav"
    _write_wav(path, rate=22050, seconds=1.0, channels=2, freq=440.0)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 32
    assert 0.45 < np.abs(audio).max() <= 1.0
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * 16000 / len(audio)
    assert abs(peak_hz - 440) < 3
    assert len(load_audio(path.read_bytes(), sampling_rate=8000)) == pytest.approx(8000, abs=32)
    assert media_duration(path) == pytest.approx(1.0, abs=1e-3)


def test_audio_errors(tmp_path):
    video = tmp_path / "v.mp4"
    _write_video(video, seconds=1)
    assert media_duration(video) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(video)
    silent = tmp_path / "empty.wav"
    _write_wav(silent, seconds=0.0)
    with pytest.raises(MediaError, match="no samples"):
        load_audio(silent)


def test_sampling_seeks_and_decodes_a_fraction_of_the_frames(tmp_path, monkeypatch):
    """The cost claim itself: 0.5 fps from a 5 fps clip with 1 s keyframes decodes about one frame
    per sample (each target is a keyframe reached by a seek), not the whole stream."""
    import model.media.decode as media

    path = tmp_path / "v.mp4"
    _write_video(path, seconds=12, fps=5, gop=5)  # 60 frames (the grey levels stay within uint8)
    counts = {"decoded": 0, "seeks": 0}
    real_open = media._open

    class Counting:  # the container as load_video_frames uses it, counting decodes and seeks
        def __init__(self, container):
            self._c = container

        def __getattr__(self, name):
            return getattr(self._c, name)

        def seek(self, *args, **kwargs):
            counts["seeks"] += 1
            return self._c.seek(*args, **kwargs)

        def decode(self, *args, **kwargs):
            for frame in self._c.decode(*args, **kwargs):
                counts["decoded"] += 1
                yield frame

    monkeypatch.setattr(media, "_open", lambda src: Counting(real_open(src)))
    frames, _ = load_video_frames(path, fps=0.5, max_frames=48)
    assert [_frame_index(f) for f in frames] == [10 * i for i in range(6)]
    assert counts["seeks"] >= 5
    assert counts["decoded"] <= 2 * len(frames)  # 12 at most, of the 60 frames in the clip
