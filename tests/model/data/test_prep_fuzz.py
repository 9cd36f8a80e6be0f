"""Data prep under generated corpora (hypothesis): valid records with real media, mutated the way a
hostile corpus is (wrong types, missing and unknown fields, truncated lines, odd strings and paths in
every field, duplicates, broken bytes), then `prepare` twice. Whatever the corpus:

- no exception escapes, and no record ends as "unexpected error" (an error class prep did not expect);
- every non-blank line ends in exactly one of the shards or the quarantine file;
- the manifest's counts add up, and everything written is strict UTF-8 JSON;
- a second run gives byte-identical shards, quarantine file and manifest.

The one exception allowed is the run-level refusal before any work when a record names s3:// media
and S3 is not configured (test_prep_hostile.py has its own test). CI runs a bounded, derandomised
set (OMNI_FUZZ_EXAMPLES, default 100); `make fuzz` runs many more with a fresh seed.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import wave
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.config import DataConfig
from model.data.prep import prepare
from model.data.shards import SPLITS, read_shard
from model.storage import StorageError
from tests.model.data.test_prep_corrupt import _mp4
from tests.summary import write_summary

EXAMPLES = int(os.environ.get("OMNI_FUZZ_EXAMPLES", "100"))
# CI: the same corpora every run (a red build names a bug, not bad luck); `make fuzz`: a fresh seed each time.
RANDOM = os.environ.get("OMNI_FUZZ_RANDOM") == "1"
LIMITS = DataConfig(max_text_chars=2000, val_fraction=0.5, records_per_shard=3)
STATS: Counter = Counter()

MEDIA = {"image": ["media/red.png", "media/blue.jpg"], "video": ["media/clip.mp4"], "audio": ["media/speech.wav"]}
# Paths a corpus should not be able to use as commands, and plain wrong ones.
ODD_PATHS = [
    "", ".", "/", "media", "media/", "media/pipe.png", "media/text.png", "media/empty.png", "media/speech.wav",
    "media/red.png/x", "missing.png", "x" * 300 + ".png", "/" + "y" * 5000, "../" * 40 + "etc/passwd", "/etc/passwd",
    "/proc/self/mem", "/proc/self/status", "/dev/zero", "/dev/null", "/sys/kernel/notes", "media/loop.png",
    "media/link-out.png", "~/red.png", "media\\red.png", "media/red.png\u0000", "media/\ud800.png", "file:///etc/hostname",
    "http://127.0.0.1:1/x.png", "media/" + "é" * 200 + ".png", " media/red.png",
]
ODD_STRINGS = [
    "", " ", "\ud800", "x\udfffy", "\u0000", "a\u0000b", "<image>", "<img>", "<video><video>", "<audio>", "\u202e",
    "\ufeff", "\r\n", "a" * 3000, "null", "{}", "🙂" * 5, "\U0010ffff", "\x7f\x1b[31m", "<image" * 5,
]
FIELDS = ["id", "task", "lang", "source", "messages", "images", "videos", "audios"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(ODD_STRINGS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
odd_text = st.sampled_from(ODD_STRINGS) | st.text(max_size=12)


@st.composite
def records(draw, index: int) -> dict:
    """A valid record: 0-2 media items (tags in the text, in order), a question and an answer."""
    kinds = draw(st.lists(st.sampled_from(sorted(MEDIA)), max_size=2))
    media: dict[str, list[str]] = {"images": [], "videos": [], "audios": []}
    for kind in kinds:
        media[kind + "s"].append(draw(st.sampled_from(MEDIA[kind])))
    question = "".join(f"<{k}>" for k in kinds) + draw(st.sampled_from(["What is it?", "Describe.", "Transcribe."]))
    answer = draw(st.sampled_from(["red", "blue", "one two", "A"]) | st.text(min_size=1, max_size=6))
    rid = draw(st.sampled_from([f"r{index}", f"r{index}", "shared-id"]))
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if draw(st.booleans()):
        turns.insert(0, {"role": "system", "content": "be brief"})
    return {"id": rid, "task": draw(st.sampled_from(["caption", "image_mcq", "asr", "chat"])), "lang": "en",
            "source": "fuzz", "messages": turns, **{k: v for k, v in media.items() if v or draw(st.booleans())}}


@st.composite
def mutated(draw, record: dict) -> dict:
    """The record with 0-3 of: a field dropped, a field or a nested value replaced by any JSON value or
    an odd string, a media path replaced by an odd one, an unknown field."""
    rec = json.loads(json.dumps(record))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "value", "string", "path", "path", "path", "unknown", "turn"]))
        field = draw(st.sampled_from(FIELDS))
        if op == "drop":
            rec.pop(field, None)
        elif op in ("value", "string"):
            rec[field] = draw(json_values if op == "value" else odd_text)
        elif op == "path":
            kind = draw(st.sampled_from(["images", "videos", "audios"]))
            paths = rec.get(kind) if isinstance(rec.get(kind), list) else []
            odd = draw(st.sampled_from(ODD_PATHS) | st.text(max_size=10))
            rec[kind] = [odd] if not paths else [odd if i == 0 else p for i, p in enumerate(paths)]
        elif op == "unknown":
            rec[draw(odd_text)] = draw(json_values)
        elif isinstance(rec.get("messages"), list) and rec["messages"] and isinstance(rec["messages"][0], dict):
            rec["messages"][0][draw(st.sampled_from(["role", "content", "name"]))] = draw(json_values | odd_text)
    return rec


def _encode(obj: dict, ascii_only: bool) -> bytes:
    # Unescaped lone surrogates become the bytes a careless writer would produce (not UTF-8).
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def lines(draw, index: int, previous: list[bytes]) -> bytes:
    """One input line: a record (maybe mutated), or a broken line of some kind."""
    line = _encode(draw(mutated(draw(records(index)))), draw(st.booleans()))
    shape = draw(st.sampled_from(["as is"] * 6 + ["truncated", "bytes", "blank", "again", "crlf", "not object"]))
    if shape == "truncated":
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    if shape == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    if shape == "blank":
        return draw(st.sampled_from([b"", b"  ", b"\t", b"\r"]))
    if shape == "again" and previous:
        return draw(st.sampled_from(previous))
    if shape == "crlf":
        return line + b"\r"
    if shape == "not object":
        return _encode(draw(json_values), True)
    return line


@st.composite
def corpora(draw) -> list[list[bytes]]:
    """1-2 JSONL files of 1-8 lines each."""
    files, n = [], 0
    for _ in range(draw(st.integers(1, 2))):
        body: list[bytes] = []
        for _ in range(draw(st.integers(1, 8))):
            body.append(draw(lines(n, body)))
            n += 1
        if draw(st.integers(0, 9)) == 0:
            body[0] = b"\xef\xbb\xbf" + body[0]  # a byte-order mark, as Windows editors write
        files.append(body)
    return files


# ------------------------------------------------------------------------------------- media


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """Real media, and the special files a hostile corpus points at."""
    root = tmp_path_factory.mktemp("fuzz-media")
    media = root / "media"
    media.mkdir()
    Image.new("RGB", (32, 32), "red").save(media / "red.png")
    Image.new("RGB", (40, 24), "blue").save(media / "blue.jpg")
    (media / "speech.wav").write_bytes(_wav(0.5))
    (media / "clip.mp4").write_bytes(_mp4(4))
    (media / "text.png").write_text("not an image")
    (media / "empty.png").write_bytes(b"")
    os.mkfifo(media / "pipe.png")
    (media / "loop.png").symlink_to(media / "loop.png")
    (media / "link-out.png").symlink_to("/etc/hostname")
    return root


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary(request):
    """The figures of this run, printed at the end (also without -s)."""
    STATS.clear()
    yield
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(STATS.items()) if k.startswith("kind "))
    write_summary(request, f"prep fuzz: {STATS['corpora']} corpora, {STATS['records']} records generated "
                           f"({STATS['kept']} kept, {STATS['quarantined']} quarantined), {STATS['crashes']} crashes, "
                           f"{STATS['refused to start']} refused to start (s3:// media without S3 settings); {kinds}")


def _read_outputs(out: Path, manifest: dict) -> tuple[list[dict], dict[str, bytes]]:
    """The quarantine lines and every shard, each decoded as strict UTF-8 JSON."""
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_bytes().decode("utf-8").splitlines()]
    shards = {s["path"]: (out / s["path"]).read_bytes() for s in manifest["shards"]}
    for blob in shards.values():
        for sample in read_shard(blob):
            json.dumps(sample, ensure_ascii=False).encode("utf-8")  # strict: raises on a surrogate
    json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    return quarantine, shards


def _check_refusal(err: StorageError, files: dict[str, list[bytes]], out: Path) -> None:
    """The one run-level refusal a local corpus can cause: an s3:// media item while S3 is not
    configured. The message names a line that has one, and nothing was written."""
    match = re.search(r"/(part-\d+\.jsonl):(\d+) uses S3 media ", str(err))
    if match is None:
        raise err
    obj = json.loads(files[match[1]][int(match[2]) - 1].removeprefix(b"\xef\xbb\xbf"))
    assert any(isinstance(u, str) and u.startswith("s3://") for k in ("images", "videos", "audios")
               for u in (obj.get(k) if isinstance(obj.get(k), list) else []))
    assert not out.exists()


def _check_accounting(files: dict[str, list[bytes]], manifest: dict, quarantine: list[dict]) -> None:
    non_blank = {(name, i) for name, body in files.items() for i, raw in enumerate(body, 1)
                 if raw.removeprefix(b"\xef\xbb\xbf").strip()}
    rejected = [(Path(q["source"]).name, q["line"]) for q in quarantine]
    assert len(rejected) == len(set(rejected)), "a line was quarantined twice"
    assert set(rejected) <= non_blank, "quarantine names a line that is not a record"
    m = manifest
    assert m["records_in"] == len(non_blank) == m["records_out"] + m["records_quarantined"]
    assert m["records_quarantined"] == len(quarantine) == sum(m["quarantine_reasons"].values())
    assert m["records_out"] == sum(m["splits"].values()) == sum(s["records"] for s in m["shards"])
    assert set(m["splits"]) == set(SPLITS)
    assert "unexpected error" not in m["quarantine_reasons"], [q for q in quarantine if q["kind"] == "unexpected error"]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(corpus=corpora())
def test_prep_survives_generated_corpora(corpus, media_dir, tiny_cfg):
    s3_settings = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    with mock.patch.dict(os.environ, {k: "" for k in s3_settings}), tempfile.TemporaryDirectory(dir=media_dir) as work:
        src = Path(work) / "in"
        src.mkdir()
        (src / "media").symlink_to(media_dir / "media")
        files = {f"part-{i}.jsonl": body for i, body in enumerate(corpus)}
        for name, body in files.items():
            (src / name).write_bytes(b"\n".join(body) + b"\n")
        STATS["corpora"] += 1
        STATS["records"] += sum(1 for body in corpus for raw in body if raw.removeprefix(b"\xef\xbb\xbf").strip())
        try:
            first = prepare([src], Path(work) / "a", LIMITS, tiny_cfg, progress=False)
            second = prepare([src], Path(work) / "b", LIMITS, tiny_cfg, progress=False)
        except StorageError as err:
            _check_refusal(err, files, Path(work) / "a")  # s3:// media without S3 settings: said before any work
            STATS["refused to start"] += 1
            return
        except BaseException:
            STATS["crashes"] += 1
            raise
        quarantine, shards = _read_outputs(Path(work) / "a", first.manifest)
        _check_accounting(files, first.manifest, quarantine)
        assert second.manifest == first.manifest
        assert _read_outputs(Path(work) / "b", second.manifest) == (quarantine, shards)
        STATS["kept"] += first.manifest["records_out"]
        STATS["quarantined"] += first.manifest["records_quarantined"]
        STATS.update(f"kind {q['kind']}" for q in quarantine)
