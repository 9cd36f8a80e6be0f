"""Data prep from and to object storage, against a real S3 server (SeaweedFS, started for this
module): inputs under an s3:// prefix with media beside them, output to s3://bucket/prefix, the
training reader streaming it back; the result equals a local run's."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from PIL import Image

import model.storage
from model.config import DataConfig
from model.data.prep import prepare
from model.data.shards import SPLITS, ShardStream
from model.storage import S3Store, StorageError
from model.text.processor import OmniProcessor
from model.text.tokenizer import load_tokenizer
from pipelines.cli import main
from tests.s3_server import S3Server, s3_server_fixture, seaweedfs

s3_server = s3_server_fixture()


@pytest.fixture()
def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture()
def raw(tmp_path):
    """A small corpus on disk: 6 good records (media in a subfolder), one missing file, one dup."""
    src = tmp_path / "raw"
    (src / "media").mkdir(parents=True)
    lines = []
    for i, color in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
        Image.new("RGB", (24 + i, 24), color).save(src / "media" / f"{i}.png")
        lines.append({"id": f"r{i}", "task": "caption", "images": [f"media/{i}.png"], "messages": [
            {"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": color}]})
    lines.append({**lines[0], "id": "dup"})
    lines.append({**lines[1], "id": "gone", "images": ["media/gone.png"]})
    (src / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:4]))
    (src / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[4:]))
    return src


def test_s3_round_trip_equals_the_local_run(raw, tmp_path, s3_env, tiny_cfg):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, "corpus", s3_env.config()).upload_dir(raw)
    cfg = DataConfig(records_per_shard=2, val_fraction=0.3)

    remote = prepare([f"s3://{bucket}/corpus/"], f"s3://{bucket}/prepared", cfg, tiny_cfg, progress=False)
    local = prepare([raw], tmp_path / "local", cfg, tiny_cfg, progress=False)
    m = remote.manifest
    assert m["records_in"] == 8 == m["records_out"] + m["records_quarantined"]
    assert m["quarantine_reasons"] == {"duplicate": 1, "missing media": 1}
    gone = next(q for q in remote.quarantined if q["id"] == "gone")
    assert gone["source"] == f"s3://{bucket}/corpus/part-1.jsonl" and "'media/gone.png' not found" in gone["reason"]
    # Same records, same bytes: only the input URIs differ.
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in local.manifest["shards"]]
    strip = ("inputs", "sha256")
    assert {k: v for k, v in m.items() if k not in strip} == {k: v for k, v in local.manifest.items() if k not in strip}

    store = S3Store(bucket, "prepared", s3_env.config())
    keys = store.list()
    assert {"manifest.json", "quarantine.jsonl"} <= set(keys)
    assert {s["path"] for s in m["shards"]} <= set(keys)
    assert json.loads(store.read_bytes("manifest.json")) == m

    processor = OmniProcessor(load_tokenizer(tmp_path / "local" / "tokenizer"), tiny_cfg)
    streams = [ShardStream(root, "train", epochs=1).configure(processor)
               for root in (f"s3://{bucket}/prepared", tmp_path / "local")]
    a, b = ([e.input_ids for e in s] for s in streams)
    assert a == b and len(a) == m["splits"]["train"]


def test_cli_prep_s3_to_s3(raw, s3_env, capsys):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, "in", s3_env.config()).upload_dir(raw)
    assert main(["data", "prep", f"s3://{bucket}/in/part-0.jsonl", f"s3://{bucket}/in/part-1.jsonl",
                 "--out", f"s3://{bucket}/out", "data.val_fraction=0.5"]) == 0
    assert f"8 in, 6 out, 2 quarantined (see s3://{bucket}/out/quarantine.jsonl)" in capsys.readouterr().out
    assert S3Store(bucket, "out", s3_env.config()).exists("manifest.json")


def test_rerun_into_the_same_prefix_replaces_the_earlier_run(raw, tmp_path, s3_env, tiny_cfg, monkeypatch):
    """The old manifest is gone before any object is overwritten (a reader sees no manifest, not a
    torn one), the new one goes last, and the earlier run's shards and media the new manifest does
    not list are removed; objects outside prep's areas stay."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    S3Store(bucket, "corpus", s3_env.config()).upload_dir(raw)
    out = f"s3://{bucket}/prepared"
    store = S3Store(bucket, "prepared", s3_env.config())
    # Many one-record shards and the media of both files first ...
    prepare([f"s3://{bucket}/corpus/"], out, DataConfig(records_per_shard=1, val_fraction=0.3), tiny_cfg,
            progress=False)
    old_keys = set(store.list())
    store.write_bytes("notes/keep.txt", b"not prep's")

    uploads: list[tuple[str, bool]] = []
    real_upload = S3Store.upload_file

    def watched(self, key, path):
        uploads.append((key, self.exists("manifest.json")))
        return real_upload(self, key, path)

    monkeypatch.setattr(S3Store, "upload_file", watched)
    # ... then fewer records (one input file) in bigger shards.
    again = prepare([f"s3://{bucket}/corpus/part-0.jsonl"], out, DataConfig(records_per_shard=4, val_fraction=0.3),
                    tiny_cfg, progress=False)
    assert uploads[-1] == ("manifest.json", False), "the manifest must be uploaded last, after the old one is gone"
    assert not any(had_manifest for _, had_manifest in uploads), "the old manifest was still there during upload"
    assert not [k for k, _ in uploads if k.startswith("media/")], "media already in the store were uploaded again"

    m = again.manifest
    assert json.loads(store.read_bytes("manifest.json")) == m
    records = [r for split in SPLITS for r in ShardStream(store, split).records()]
    media = {p for r in records for p in r.images + r.videos + r.audios}
    assert set(store.list("shards/")) == {s["path"] for s in m["shards"]}
    assert set(store.list("media/")) == media and len(media) == m["media"]["files"] == 4  # r0..r3 of part-0
    assert {k for k in old_keys if k.startswith(("shards/", "media/"))} - set(store.list()), "nothing stale removed"
    assert store.read_bytes("notes/keep.txt") == b"not prep's"
    store.download_dir("tokenizer", tmp_path / "tok")
    processor = OmniProcessor(load_tokenizer(tmp_path / "tok"), tiny_cfg)
    assert len(list(ShardStream(out, "train", epochs=1).configure(processor))) == m["splits"]["train"]


def test_the_store_going_away_during_upload_leaves_no_manifest(raw, tmp_path, tiny_cfg, monkeypatch):
    """SeaweedFS stopped by PID in the middle of the upload of a re-run: the upload is retried with
    backoff, then prep fails with a clear message; the old manifest is already gone and the new one
    was never written, so no manifest vouches for missing shards. A re-run completes."""
    with seaweedfs() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        S3Store(bucket, "corpus", server.config()).upload_dir(raw)
        out, store = f"s3://{bucket}/prepared", S3Store(bucket, "prepared", server.config())
        prepare([f"s3://{bucket}/corpus/"], out, DataConfig(val_fraction=0.3), tiny_cfg, progress=False)
        assert store.exists("manifest.json")

        waits: list[float] = []
        real_retries, real_upload = model.storage.with_retries, S3Store.upload_file
        uploads = []

        def recorded(fn, *args, **kwargs):
            return real_retries(fn, *args, sleep=lambda s: (waits.append(s), time.sleep(s)), **kwargs)

        def upload(self, key, path):
            uploads.append(key)
            if len(uploads) == 2:
                server.stop()  # the outage: one file is up, the rest are not
            return real_upload(self, key, path)

        monkeypatch.setattr(model.storage, "with_retries", recorded)
        monkeypatch.setattr(S3Store, "upload_file", upload)
        again = DataConfig(val_fraction=0.3, records_per_shard=1)  # other shards than the first run's
        with pytest.raises(StorageError, match=r"uploading the prepared data set to s3://.*/prepared stopped after 1 "
                                               r"of \d+ files: S3 endpoint .* unreachable after 5 attempts"):
            prepare([f"s3://{bucket}/corpus/"], out, again, tiny_cfg, progress=False)
        assert waits[:4] == [0.2, 0.4, 0.8, 1.6]  # StorageConfig's backoff, doubling

        monkeypatch.setattr(S3Store, "upload_file", real_upload)
        server.start()
        assert not store.exists("manifest.json")
        result = prepare([f"s3://{bucket}/corpus/"], out, again, tiny_cfg, progress=False)
        assert json.loads(store.read_bytes("manifest.json")) == result.manifest
        assert {s["path"] for s in result.manifest["shards"]} <= set(store.list("shards/"))
