"""The corrupt-input suite: one corpus with good records and one bad record of each kind, prepared
once; each kind is its own test case asserting the quarantine line (source, line, id, kind, the
reason's wording) and the accounting invariant."""

from __future__ import annotations

import io
import json
import struct
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from model.config import DataConfig
from model.data.prep import prepare
from model.data.shards import SPLITS, ShardStream


def _wav(path: Path, seconds: float, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes())


def _mp4(frames: int, fps: int = 4) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), (40 * (i % 6), 90, 200)))
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _no_frames_mp4() -> bytes:
    """A well-formed mp4 (header, index, duration) whose every coded frame is zeroed out."""
    blob = bytearray(_mp4(8))
    at = blob.find(b"mdat")
    size = struct.unpack(">I", blob[at - 4 : at])[0]
    blob[at + 4 : at - 4 + size] = bytes(size - 8)
    return bytes(blob)


def _video_track_without_frames() -> bytes:
    """A valid container (NUT: it keeps a track that got no packets, where mp4 drops it) with an
    H.264 video stream that has no frames at all, next to 1 s of audio that gives it a duration."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="nut") as container:
        video = container.add_stream("libx264", rate=4)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*audio.encode(frame), *audio.encode(), *video.encode()]:
            container.mux(packet)
    return buf.getvalue()


def _long_mp4(seconds: int) -> bytes:
    """A tiny clip (16x16, 1 fps) that is long only in time."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for i in range(seconds):
            frame = av.VideoFrame.from_image(Image.new("RGB", (16, 16), (30 * i % 255, 90, 200)))
            frame.pts, frame.time_base = i, Fraction(1, 1)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buf.getvalue()


def _rec(rid, user="<image>What color is it?", answer="red", **media):
    return {"id": rid, "task": "caption",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **media}


# kind -> (the JSONL line, the quarantine kind, substrings of the reason). Ids equal the kind, so
# each case finds its line; lines that cannot carry an id are found by line number.
def _cases() -> dict[str, tuple[bytes, str, list[str]]]:
    def line(obj) -> bytes:
        return json.dumps(obj).encode()

    return {
        "truncated_jpeg": (line(_rec("truncated_jpeg", images=["truncated.jpg"])), "bad image",
                           ["'truncated.jpg': corrupt or truncated image", "replace the file"]),
        "zero_byte_file": (line(_rec("zero_byte_file", images=["empty.png"])), "bad image",
                           ["'empty.png' is an empty file (0 bytes)"]),
        "text_named_png": (line(_rec("text_named_png", images=["text.png"])), "bad image",
                           ["'text.png': not a recognised image format"]),
        "missing_file": (line(_rec("missing_file", images=["nowhere/missing.png"])), "missing media",
                         ["'nowhere/missing.png' not found", "relative paths resolve against the JSONL file's folder"]),
        "malformed_json": (b'{"id": "malformed_json", "messages": [', "malformed JSON",
                           ["malformed JSON", "column", "one complete JSON object"]),
        "tag_media_mismatch": (line(_rec("tag_media_mismatch", user="<image><image>Same?", images=["red.png"])),
                               "tag/media mismatch", ["2 <image> tag(s) in the text but 1 item(s) in `images`"]),
        "unknown_tag": (line(_rec("unknown_tag", user="<img>What is it?")), "unknown media tag",
                        ["unknown media tag '<img>'", "use <image>, <video> or <audio>"]),
        "video_corrupt_frames": (line(_rec("video_corrupt_frames", user="<video>What moves?",
                                           videos=["zeroed.mp4"])), "bad video",
                                 ["'zeroed.mp4'", "corrupt video", "readable video"]),
        "video_no_decodable_frames": (line(_rec("video_no_decodable_frames", user="<video>What moves?",
                                                videos=["no_frames.nut"])), "bad video",
                                      ["'no_frames.nut': no decodable video frames", "readable video"]),
        "video_zero_bytes": (line(_rec("video_zero_bytes", user="<video>What moves?", videos=["empty.mp4"])),
                             "bad video", ["'empty.mp4' is an empty file (0 bytes)", "readable video"]),
        "video_too_long": (line(_rec("video_too_long", user="<video>What moves?", videos=["long.mp4"])),
                           "video too long", ["'long.mp4' is 4.0 s, over data.max_video_seconds=3.0",
                                              "cut the video"]),
        "image_given_as_video": (line(_rec("image_given_as_video", user="<video>What moves?",
                                           videos=["still.mp4"])), "bad video",
                                 ["'still.mp4': a still png image, not a video", "readable video"]),
        "video_without_video_stream": (line(_rec("video_without_video_stream", user="<video>What moves?",
                                                 videos=["sound_only.mp4"])), "bad video",
                                       ["'sound_only.mp4'", "no video stream"]),
        "audio_wrong_format": (line(_rec("audio_wrong_format", user="<audio>Transcribe.", audios=["text.wav"])),
                               "bad audio", ["'text.wav': cannot open container", "readable audio"]),
        "audio_zero_bytes": (line(_rec("audio_zero_bytes", user="<audio>Transcribe.", audios=["empty.wav"])),
                             "bad audio", ["'empty.wav' is an empty file (0 bytes)", "readable audio"]),
        "audio_too_short": (line(_rec("audio_too_short", user="<audio>Transcribe.", audios=["short.wav"])),
                            "audio length", ["'short.wav' is 0.050 s, under data.min_audio_seconds=0.1"]),
        "audio_too_long": (line(_rec("audio_too_long", user="<audio>Transcribe.", audios=["long.wav"])),
                           "audio length", ["'long.wav' is 3.0 s, over data.max_audio_seconds=2.0"]),
        "audio_low_sample_rate": (line(_rec("audio_low_sample_rate", user="<audio>Transcribe.", audios=["4k.wav"])),
                                  "audio sample rate", ["sampled at 4000 Hz, under data.min_audio_sample_rate=8000"]),
        "image_too_large": (line(_rec("image_too_large", images=["big.png"])), "image size",
                            ["'big.png' is 200x200 = 40000 pixels, over data.max_image_pixels=10000"]),
        "image_too_small": (line(_rec("image_too_small", images=["tiny.png"])), "image size",
                            ["under data.min_image_side=8"]),
        "duplicate_record": (line(_rec("duplicate_record", images=["red_copy.png"])), "duplicate",
                             ["same text and media as record 'good_image'"]),
        "duplicate_id": (line(_rec("good_text", user="Another question?", answer="yes")), "duplicate id",
                         ["id 'good_text' is already used by the record at"]),
        "non_utf8_bytes": (b'{"id": "non_utf8_bytes", "x": "caf\xe9"}', "not UTF-8",
                           ["invalid byte 0xe9", "save the file as UTF-8"]),
        "lone_surrogate": (b'{"id": "lone_surrogate", "messages": [{"role": "user", "content": "hi \\ud800"}, '
                           b'{"role": "assistant", "content": "ok"}]}', "not UTF-8", ["unpaired surrogate"]),
        "no_answer": (line(_rec("no_answer", user="Hello?", answer="  ")), "no answer",
                      ["needs a non-empty assistant turn"]),
        "not_an_object": (b'["a", "list"]', "invalid record", ["expected a JSON object, got list"]),
        "missing_messages": (line({"id": "missing_messages", "task": "caption"}), "invalid record",
                             ["messages: Field required"]),
        "text_too_long": (line(_rec("text_too_long", user="x" * 500, answer="y")), "text too long",
                          ["over data.max_text_chars=400"]),
        "too_many_tokens": (line(_rec("too_many_tokens", user="<image>" * 6 + "Which differs?", answer="none",
                                      images=["red.png"] * 6)), "too many tokens", ["over model.max_seq_len=384"]),
    }


GOOD = [
    _rec("good_image", images=["red.png"]),
    _rec("good_audio", user="<audio>Transcribe.", answer="one", audios=["speech.wav"]),
    _rec("good_video", user="<video>What color?", answer="blue", videos=["clip.mp4"]),
    _rec("good_text", user="What is 2 plus 3?", answer="5"),
]
LIMITS = DataConfig(max_image_pixels=10_000, max_audio_seconds=2.0, min_audio_seconds=0.1, max_video_seconds=3.0,
                    max_text_chars=400, val_fraction=0.5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_cfg):
    src = tmp_path_factory.mktemp("corrupt")
    Image.new("RGB", (32, 32), "red").save(src / "red.png")
    (src / "red_copy.png").write_bytes((src / "red.png").read_bytes())  # same pixels, other name
    jpeg = io.BytesIO()  # noise, so the scan data is long: the cut lands in it, after a valid header
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3])
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("this is not an image")
    (src / "text.wav").write_text("this is not audio either")
    Image.new("RGB", (200, 200), "blue").save(src / "big.png")
    Image.new("RGB", (4, 4), "blue").save(src / "tiny.png")
    _wav(src / "speech.wav", 1.0)
    _wav(src / "long.wav", 3.0)
    _wav(src / "4k.wav", 1.0, rate=4000)
    (src / "clip.mp4").write_bytes(_mp4(8))
    (src / "zeroed.mp4").write_bytes(_no_frames_mp4())
    (src / "sound_only.mp4").write_bytes(_audio_only_mp4())
    (src / "no_frames.nut").write_bytes(_video_track_without_frames())
    (src / "long.mp4").write_bytes(_long_mp4(4))
    Image.new("RGB", (32, 32), "green").save(src / "still.mp4", format="PNG")  # a picture named as a clip
    (src / "empty.mp4").write_bytes(b"")
    (src / "empty.wav").write_bytes(b"")
    _wav(src / "short.wav", 0.05)
    cases = _cases()
    lines = [json.dumps(r).encode() for r in GOOD] + [bad for bad, _, _ in cases.values()]
    (src / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")  # a blank line is not a record
    line_of = {kind: len(GOOD) + i + 1 for i, kind in enumerate(cases)}
    result = prepare([src], tmp_path_factory.mktemp("out"), LIMITS, tiny_cfg, progress=False)
    return result, line_of, cases


@pytest.mark.parametrize("kind", list(_cases()))
def test_each_kind_of_bad_record_is_quarantined_with_a_reason(prepared, kind):
    result, line_of, cases = prepared
    _, expected_kind, phrases = cases[kind]
    lines = [q for q in result.quarantined if q["line"] == line_of[kind]]
    assert len(lines) == 1, f"{kind}: expected one quarantine line, got {lines}"
    q = lines[0]
    assert q["source"].endswith("data.jsonl")
    assert q["kind"] == expected_kind and q["reason"].startswith(expected_kind + ": ")
    for phrase in phrases:
        assert phrase in q["reason"], f"{kind}: {phrase!r} not in {q['reason']!r}"
    if kind not in ("malformed_json", "non_utf8_bytes", "not_an_object", "duplicate_id"):
        assert q["id"] == kind
    m = result.manifest
    assert m["records_in"] == m["records_out"] + m["records_quarantined"]


def test_accounting_good_records_kept_and_nothing_dropped_silently(prepared):
    result, line_of, cases = prepared
    m = result.manifest
    assert m["records_in"] == len(GOOD) + len(cases)  # the blank line is not counted
    assert m["records_out"] == len(GOOD) and m["records_quarantined"] == len(cases)
    assert sorted(q["line"] for q in result.quarantined) == sorted(line_of.values())
    out = Path(result.out)
    records = [r for split in SPLITS for r in ShardStream(out, split).records()]
    kept = [r.id for r in records]
    assert sorted(kept) == sorted(r["id"] for r in GOOD)
    assert sum(1 for _ in (out / "quarantine.jsonl").open()) == len(cases)
    assert sum(m["quarantine_reasons"].values()) == len(cases)
    # Media of rejected records (the duplicate's, staged before the duplicate was found) are not kept.
    referenced = {p for r in records for p in r.images + r.videos + r.audios}
    assert {f"media/{p.name}" for p in (out / "media").iterdir()} == referenced
