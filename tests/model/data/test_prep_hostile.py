"""Records a hostile corpus would hold, one test per way a single record used to abort the whole
run: media paths that are too long, name special files or point outside the allowed folders, text
that cannot be written as UTF-8 in any field, s3:// media without S3 settings. Each record must end
in quarantine (or the run refuse to start, for configuration) and the good records still come out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from model.config import DataConfig
from model.data.prep import prepare
from model.data.shards import SPLITS, ShardStream
from model.storage import StorageError


def _rec(rid, images=("red.png",), user="<image>What color?", **fields) -> dict:
    return {"id": rid, "task": "caption", "images": list(images),
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "red"}], **fields}


@pytest.fixture()
def corpus(tmp_path) -> Path:
    src = tmp_path / "corpus"
    src.mkdir()
    Image.new("RGB", (32, 32), "red").save(src / "red.png")
    return src


def _prep(src: Path, out: Path, lines: list[bytes | dict], tiny_cfg, **data) -> tuple[dict, dict[str, dict]]:
    """Run prep over a good record followed by `lines`; the manifest and the quarantine by id (or line)."""
    raw = [json.dumps(_rec("good")).encode()] + [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    (src / "data.jsonl").write_bytes(b"\n".join(raw) + b"\n")
    result = prepare([src], out, DataConfig(**data), tiny_cfg, progress=False)
    m = result.manifest
    assert m["records_in"] == len(raw) == m["records_out"] + m["records_quarantined"]
    assert m["records_out"] == 1, result.quarantined
    kept = [r.id for split in SPLITS for r in ShardStream(out, split).records()]
    assert kept == ["good"]
    # Everything prep wrote is strict UTF-8 JSON.
    written = [json.loads(line) for line in (out / "quarantine.jsonl").read_bytes().decode("utf-8").splitlines()]
    assert len(written) == m["records_quarantined"]
    json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    return m, {q["id"] or f"line {q['line']}": q for q in result.quarantined}


def test_a_media_path_too_long_for_the_file_system_is_quarantined(corpus, tmp_path, tiny_cfg):
    long_name = "x" * 5000 + ".png"  # ENAMETOOLONG (Errno 36): once a traceback that ended the run
    lines = [_rec("long", images=[long_name]), _rec("long-abs", images=["/" + long_name])]
    m, q = _prep(corpus, tmp_path / "out", lines, tiny_cfg)
    for rid in ("long", "long-abs"):
        assert q[rid]["kind"] == "unreadable media" and "cannot be read (File name too long)" in q[rid]["reason"]
    assert m["quarantine_reasons"] == {"unreadable media": 2}


@pytest.mark.parametrize("field", ["id", "task", "lang", "source", "images", "extra key", "messages.0.role"])
def test_a_lone_surrogate_in_any_field_is_refused_at_validation(corpus, tmp_path, tiny_cfg, field):
    """"\\ud800" escaped in the JSON parses, passes the schema as a string and used to kill the run at
    the very end, writing the shards or the quarantine file (UnicodeEncodeError)."""
    bad = "x\\ud800y"
    rec = json.dumps(_rec("placeholder"))
    if field == "images":
        rec = rec.replace('"red.png"', f'"{bad}.png"')
    elif field == "extra key":
        rec = rec[:-1] + f', "{bad}": 1}}'
    elif field == "messages.0.role":
        rec = rec.replace('"role": "user"', f'"role": "{bad}"')
    elif field == "id":
        rec = rec.replace('"placeholder"', f'"{bad}"')
    else:
        rec = rec[:-1] + f', "{field}": "{bad}"}}'
    _, q = _prep(corpus, tmp_path / "out", [rec.encode()], tiny_cfg)
    [entry] = q.values()
    assert entry["kind"] == "not UTF-8" and "unpaired surrogate '\\ud800' at character 1" in entry["reason"]
    assert entry["id"] == (None if field == "id" else "placeholder")


def test_nul_characters_are_refused_in_any_field(corpus, tmp_path, tiny_cfg):
    lines = [_rec("nul-text", user="<image>What\u0000 color?"), _rec("nul-path", images=["red.png\u0000.txt"]),
             _rec("nul-task", task="cap\u0000tion")]
    m, q = _prep(corpus, tmp_path / "out", lines, tiny_cfg)
    assert m["quarantine_reasons"] == {"NUL character": 3}
    assert "messages.0.content: NUL" in q["nul-text"]["reason"] and "images.0: NUL" in q["nul-path"]["reason"]


def test_quarantine_lines_stay_one_line_to_unicode_readers(corpus, tmp_path, tiny_cfg):
    """Found by the fuzz test: JSON leaves U+2028/U+2029/U+0085 raw, and str.splitlines (and JavaScript,
    and many editors) break lines there, so one quarantine entry read as two broken ones."""
    out = tmp_path / "out"
    _, q = _prep(corpus, out, [_rec("sep", user="<image>What\u2028color\u2029is\x85it?", images=[])], tiny_cfg)
    assert q["sep"]["kind"] == "tag/media mismatch"
    text = (out / "quarantine.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1 and json.loads(text)["id"] == "sep"


def test_an_input_file_name_that_is_not_utf8_is_written_escaped(corpus, tmp_path, tiny_cfg):
    name = os.fsdecode(b"caf\xe9.jsonl")  # a Linux name is bytes: Python holds this one with a lone surrogate
    (corpus / name).write_text(json.dumps(_rec("good")) + "\n{broken\n")
    out = tmp_path / "out"
    result = prepare([corpus], out, DataConfig(), tiny_cfg, progress=False)
    [q] = result.quarantined
    assert q["source"].endswith("caf\\udce9.jsonl") and q["kind"] == "malformed JSON"
    assert json.loads((out / "quarantine.jsonl").read_bytes().decode("utf-8"))["source"] == q["source"]
    assert result.manifest["inputs"][0]["uri"] == q["source"]


def test_special_files_are_not_read(corpus, tmp_path, tiny_cfg):
    os.mkfifo(corpus / "pipe.png")  # reading it would block the run forever
    (corpus / "folder.png").mkdir()
    lines = [_rec("proc-mem", images=["/proc/self/mem"]), _rec("proc-status", images=["/proc/self/status"]),
             _rec("dev-zero", images=["/dev/zero"]), _rec("fifo", images=["pipe.png"]),
             _rec("folder", images=["folder.png"]), _rec("empty-path", images=[""])]
    m, q = _prep(corpus, tmp_path / "out", lines, tiny_cfg)
    assert m["quarantine_reasons"] == {"unreadable media": 6}
    assert "'/proc/self/mem' is a kernel interface (/proc or /sys)" in q["proc-mem"]["reason"]
    assert "'/proc/self/status' is a kernel interface" in q["proc-status"]["reason"]
    assert "'/dev/zero' is a device, pipe or socket, not a regular file" in q["dev-zero"]["reason"]
    assert "'pipe.png' is a device, pipe or socket" in q["fifo"]["reason"]
    assert "'folder.png' is a folder" in q["folder"]["reason"] and "is a folder" in q["empty-path"]["reason"]


def test_media_roots_keep_a_corpus_to_its_folders(corpus, tmp_path, tiny_cfg):
    outside = tmp_path / "secrets"
    outside.mkdir()
    Image.new("RGB", (32, 32), "blue").save(outside / "blue.png")
    (corpus / "link.png").symlink_to(outside / "blue.png")  # a link inside the corpus to a file outside
    roots = tmp_path / "allowed"
    roots.mkdir()
    Image.new("RGB", (32, 32), "green").save(roots / "green.png")
    lines = [_rec("absolute", images=[str(outside / "blue.png")]), _rec("climb", images=["../secrets/blue.png"]),
             _rec("link", images=["link.png"]), _rec("in-root", images=[str(roots / "green.png")])]
    raw = [json.dumps(_rec("good")).encode()] + [json.dumps(x).encode() for x in lines]
    (corpus / "data.jsonl").write_bytes(b"\n".join(raw))
    result = prepare([corpus], tmp_path / "out", DataConfig(media_roots=[str(roots)]), tiny_cfg, progress=False)
    q = {e["id"]: e for e in result.quarantined}
    assert set(q) == {"absolute", "climb", "link"} and {e["kind"] for e in q.values()} == {"media outside roots"}
    assert f"resolves to '{outside / 'blue.png'}', outside data.media_roots" in q["link"]["reason"]
    assert result.manifest["records_out"] == 2  # its own folder, and the allowed root
    # Without roots, absolute paths are read as before (the documented default).
    again = prepare([corpus], tmp_path / "out2", DataConfig(), tiny_cfg, progress=False)
    assert again.manifest["records_out"] == 3 and again.manifest["quarantine_reasons"] == {"duplicate": 2}


def test_media_over_the_size_limit_is_refused_before_reading(corpus, tmp_path, tiny_cfg):
    Image.new("RGB", (64, 64), "blue").save(corpus / "big.png")
    limit = (corpus / "big.png").stat().st_size - 1
    _, q = _prep(corpus, tmp_path / "out", [_rec("big", images=["big.png"])], tiny_cfg, max_media_bytes=limit)
    assert q["big"]["kind"] == "media too large" and f"over data.max_media_bytes={limit}" in q["big"]["reason"]


def test_s3_media_without_s3_settings_refuses_to_start(corpus, tmp_path, tiny_cfg, monkeypatch):
    """A configuration problem: said before any work, not halfway through (or once per record)."""
    for key in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    lines = [json.dumps(_rec("good")), "{broken", json.dumps(_rec("remote", images=["s3://bucket/red.png"]))]
    (corpus / "data.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=r"data.jsonl:3 uses S3 media \('s3://bucket/red.png'\): S3 storage needs "
                                           r"the environment variable\(s\) S3_ENDPOINT_URL"):
        prepare([corpus], out, DataConfig(), tiny_cfg, progress=False)
    assert not out.exists()
    with pytest.raises(StorageError, match="the output s3://bucket/prepared is on S3: S3 storage needs"):
        prepare([corpus], "s3://bucket/prepared", DataConfig(), tiny_cfg, progress=False)


def test_an_output_that_cannot_be_written_stops_before_any_work(corpus, tmp_path, tiny_cfg):
    (corpus / "data.jsonl").write_text(json.dumps(_rec("good")))
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(StorageError, match="the output folder .* cannot be written"):
        prepare([corpus], tmp_path / "file" / "out", DataConfig(), tiny_cfg, progress=False)
