"""A tiny raw corpus for the data-prep report and component tests: `write_media` puts a good image,
a text file named .png and 1 s of 16 kHz audio in a folder; `chat_record` writes JSONL lines."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
from PIL import Image


def chat_record(rid: str, user: str, answer: str, **media) -> str:
    return json.dumps({"id": rid, "task": "caption", "messages": [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}], **media})


def write_media(src: Path) -> Path:
    src.mkdir()
    Image.new("RGB", (32, 32), "red").save(src / "red.png")
    (src / "bad.png").write_text("<script>not an image</script>")
    with wave.open(str(src / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.random.default_rng(0).normal(0, 0.1, 16000) * 32767).astype("<i2").tobytes())
    return src
