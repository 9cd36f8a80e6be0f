"""Test media: an mp4 whose frames and sound say which second they belong to; spoken words (espeak-ng)
as samples, as a WAV of any layout, or as a video's sound track."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

RATE = 44100  # the sound's source rate (the reader resamples to the model's)


def write_video_with_sound(path: Path, seconds: int = 4, fps: int = 10, sound_seconds: float | None = None,
                           loud_second: int = 2, sound: bool = True, track: np.ndarray | None = None) -> None:
    """H.264 frames (flat grey of level 40 * second) and an AAC track that is silent except for a
    440 Hz tone during `loud_second`; `sound_seconds` (default: `seconds`) sets the track's length.
    `track` (float samples at RATE) replaces the tone track."""
    with av.open(str(path), "w", format="mp4") as c:
        video = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = c.add_stream("aac", rate=RATE, layout="mono") if sound else None
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * (i // fps), np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            c.mux(video.encode(frame))
        c.mux(video.encode())
        if audio is None:
            return
        n = int(RATE * (seconds if sound_seconds is None else sound_seconds)) if track is None else len(track)
        t = np.arange(n) / RATE
        tone = np.where((t >= loud_second) & (t < loud_second + 1), 0.5 * np.sin(2 * np.pi * 440 * t), 0.0)
        samples = tone if track is None else track
        for start in range(0, n, 1024):
            chunk = samples[start : start + 1024].astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, start, Fraction(1, RATE)
            c.mux(audio.encode(frame))
        c.mux(audio.encode())


def mp4_bytes(seconds: int = 2, fps: int = 4, side: int = 32, step: int = 20) -> bytes:
    """A silent mp4 (libx264) of `seconds` at `fps`, `side` x `side`, frame i grey at step * i."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        s.width = s.height = side
        s.pix_fmt = "yuv420p"
        for i in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), step * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return buf.getvalue()


def spoken(text: str, rate: int, lead_s: float = 0.6, tail_s: float = 0.3) -> np.ndarray:
    """`text` said by espeak-ng as float samples in [-1, 1] at `rate`, with silence before and after
    (the test skips where espeak-ng is not installed)."""
    import pytest

    from model.media.decode import load_audio

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "150", text], check=True, capture_output=True).stdout
    voice = load_audio(wav, rate)
    return np.concatenate([np.zeros(int(rate * lead_s), np.float32), voice, np.zeros(int(rate * tail_s), np.float32)])


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> Path:
    """16-bit PCM WAV of float `samples`, the same sound on every channel."""
    pcm = (np.clip(samples, -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm, channels).tobytes())
    return path
