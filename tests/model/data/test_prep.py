import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from model.config import DataConfig
from model.data.prep import prepare
from model.data.shards import SPLITS, ShardStream


def _rec(rid, content="<image>What color?", answer="red", images=("img.png",), **extra):
    return {"id": rid, "task": "caption", "messages": [{"role": "user", "content": content},
                                                       {"role": "assistant", "content": answer}],
            "images": list(images), **extra}


@pytest.fixture()
def corpus(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (32, 32), "red").save(src / "img.png")
    Image.new("RGB", (32, 32), "blue").save(src / "blue.jpg")
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("not an image")
    lines = [
        json.dumps(_rec("good-1")),
        json.dumps(_rec("good-2", images=("blue.jpg",), answer="blue")),
        json.dumps(_rec("dup-of-1")),  # same text + same image bytes as good-1
        "{not json",
        json.dumps(_rec("no-file", images=("missing.png",))),
        json.dumps(_rec("zero-bytes", images=("empty.png",))),
        json.dumps(_rec("wrong-type", images=("text.png",))),
        json.dumps(_rec("count-mismatch", content="<image><image>two?")),
        json.dumps(_rec("unknown-tag", content="<img>what?", images=())),
        json.dumps(_rec("no-answer", answer=" ")),
    ]
    (src / "data.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe broken utf8\n")
    return src


def test_every_bad_record_is_quarantined_with_a_reason(corpus, tmp_path, tiny_cfg):
    out = tmp_path / "out"
    result = prepare([corpus], out, DataConfig(val_fraction=0.5), tiny_cfg, progress=False)
    m = result.manifest
    assert m["records_in"] == 11 == m["records_out"] + m["records_quarantined"]
    assert m["records_out"] == 2
    reasons = {q["id"]: q["reason"] for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}
    assert "same text and media as record 'good-1'" in reasons["dup-of-1"]
    assert "not found" in reasons["no-file"]
    assert reasons["zero-bytes"].startswith("bad image") and reasons["wrong-type"].startswith("bad image")
    assert "2 <image> tag(s)" in reasons["count-mismatch"]
    assert "unknown media tag" in reasons["unknown-tag"]
    assert "non-empty assistant turn" in reasons["no-answer"]
    anonymous = [q for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines()) if q["id"] is None]
    assert sorted(q["reason"].split(":")[0] for q in anonymous) == ["malformed JSON", "not UTF-8"]
    assert all(q["line"] > 0 and q["source"].endswith("data.jsonl") for q in anonymous)
    # media normalised to content-addressed PNGs, stored once
    kept = [r.model_dump() for split in SPLITS for r in ShardStream(out, split).records()]
    assert all(r["images"][0].startswith("media/") and r["images"][0].endswith(".png") for r in kept)
    assert (out / "tokenizer").is_dir()


def test_prep_is_deterministic_and_idempotent(corpus, tmp_path, tiny_cfg):
    a = prepare([corpus], tmp_path / "a", DataConfig(), tiny_cfg, progress=False).manifest
    b = prepare([corpus], tmp_path / "b", DataConfig(), tiny_cfg, progress=False).manifest
    assert a == b
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    for shard in a["shards"]:
        assert (tmp_path / "a" / shard["path"]).read_bytes() == (tmp_path / "b" / shard["path"]).read_bytes()
    # Again into the same folder, with a smaller shard size first: only the current shards remain.
    prepare([corpus], tmp_path / "a", DataConfig(records_per_shard=1), tiny_cfg, progress=False)
    again = prepare([corpus], tmp_path / "a", DataConfig(), tiny_cfg, progress=False).manifest
    assert again == a
    assert sorted(p.name for p in (tmp_path / "a" / "shards").iterdir()) == sorted(
        Path(s["path"]).name for s in a["shards"])


def test_manifest_fields_and_shards(corpus, tmp_path, tiny_cfg):
    m = prepare([corpus], tmp_path / "out", DataConfig(val_fraction=0.5, records_per_shard=1), tiny_cfg,
                progress=False).manifest
    assert m["format"] == "omni-shards/1"
    assert m["modalities"]["image"] == {"records": 2, "items": 2}
    assert m["splits"]["train"] + m["splits"]["val"] == m["records_out"] == 2
    assert m["tasks"] == {"caption": 2}
    assert m["quarantine_reasons"]["bad image"] == 2 and m["quarantine_reasons"]["duplicate"] == 1
    assert len(m["shards"]) == 2 and all(s["records"] == 1 for s in m["shards"])
    for key in ("config_sha256", "tokenizer_sha256", "encoding_fingerprint", "sha256"):
        assert len(m[key]) == 64
    assert [q["line"] for q in map(json.loads, (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines())]
    assert len(list((tmp_path / "out" / "media").iterdir())) == m["media"]["files"] == 2


def test_over_long_records_are_quarantined(corpus, tmp_path, tiny_cfg):
    shutil.copy(corpus / "img.png", corpus / "copy.png")
    short = tiny_cfg.model_copy(update={"max_seq_len": 20})
    result = prepare([corpus], tmp_path / "out", DataConfig(), short, progress=False)
    assert any("max_seq_len" in q["reason"] for q in result.quarantined)
    assert result.manifest["records_out"] == 0


def test_an_unexpected_error_quarantines_the_record_instead_of_crashing(corpus, tmp_path, tiny_cfg, monkeypatch):
    import model.data.normalise

    def broken(uri, *args):
        if uri == "blue.jpg":
            raise RuntimeError("decoder bug")
        return real(uri, *args)

    real = model.data.normalise.fetch_media
    monkeypatch.setattr(model.data.normalise, "fetch_media", broken)
    result = prepare([corpus], tmp_path / "out", DataConfig(), tiny_cfg, progress=False)
    q = next(q for q in result.quarantined if q["id"] == "good-2")
    assert q["kind"] == "unexpected error" and "RuntimeError: decoder bug" in q["reason"]
    m = result.manifest
    assert m["records_in"] == m["records_out"] + m["records_quarantined"] and m["records_out"] == 1


def test_an_unexpected_error_while_parsing_keeps_the_record_id(corpus, tmp_path, tiny_cfg, monkeypatch):
    import model.data.validate
    from model.data.records import Record

    class Exploding:  # a bug inside parse_record's validation, after the JSON parsed
        @staticmethod
        def model_validate(obj):
            if obj.get("id") == "good-2":
                raise RuntimeError("validator bug")
            return Record.model_validate(obj)

    monkeypatch.setattr(model.data.validate, "Record", Exploding)
    result = prepare([corpus], tmp_path / "out", DataConfig(), tiny_cfg, progress=False)
    q = next(q for q in result.quarantined if "validator bug" in q["reason"])
    assert q["id"] == "good-2" and q["kind"] == "unexpected error" and q["line"] == 2
    m = result.manifest
    assert m["records_in"] == m["records_out"] + m["records_quarantined"] and m["records_out"] == 1


def test_utf8_bom_is_accepted_and_deep_nesting_is_malformed_json(tmp_path, tiny_cfg):
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps(_rec("bom-first", content="What is 1 plus 1?", answer="2", images=())),
             json.dumps(_rec("second", content="What is 2 plus 2?", answer="4", images=())),
             "[" * 100_000]
    (src / "windows.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    result = prepare([src], tmp_path / "out", DataConfig(), tiny_cfg, progress=False)
    m = result.manifest
    assert m["records_in"] == 3 and m["records_out"] == 2 and m["records_quarantined"] == 1
    assert result.quarantined[0]["line"] == 3
    assert result.quarantined[0]["reason"].startswith("malformed JSON: nested too deeply to parse")
