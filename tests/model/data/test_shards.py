"""The shard format and the streaming reader: byte-stable shards, deterministic order, resume from a
recorded position, rank and DataLoader-worker splits, packing plans, stale-processor detection, and
train_stage streaming from shards (resume bit-for-bit)."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model.config import DataConfig, StageConfig
from model.data.prep import prepare
from model.data.shards import ShardStream, StaleShardsError, read_shard, shard_bytes
from model.nn.omni import OmniModel
from model.text.processor import OmniProcessor
from model.text.tokenizer import load_tokenizer, train_tokenizer
from model.training.recipe import train_stage

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0)}


def _chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_cfg) -> Path:
    """30 records (images, audio, text) in shards of 4."""
    src = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(14):
        color = list(COLORS)[i % 4]
        Image.new("RGB", (32 + i, 32), COLORS[color]).save(src / f"img{i}.png")
        lines.append({"id": f"img-{i}", "task": "caption", "images": [f"img{i}.png"],
                      "messages": _chat("<image>What color?" + " please" * (i % 5), color)})
    for i in range(8):
        with wave.open(str(src / f"a{i}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((rng.normal(0, 0.1, 8000 + 2000 * i) * 32767).astype("<i2").tobytes())
        lines.append({"id": f"asr-{i}", "task": "asr", "audios": [f"a{i}.wav"],
                      "messages": _chat("<audio>Transcribe the audio.", "one two"[: 3 + i % 4])})
    for i in range(8):
        lines.append({"id": f"txt-{i}", "task": "text_qa", "messages": _chat(f"What is {i} plus 1?", str(i + 1))})
    (src / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path_factory.mktemp("prepared")
    prepare([src], out, DataConfig(records_per_shard=4, val_fraction=0.1), tiny_cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def processor(prepared, tiny_cfg) -> OmniProcessor:
    return OmniProcessor(load_tokenizer(prepared / "tokenizer"), tiny_cfg)


def _ids(items) -> list[str]:
    return [json.dumps(x.input_ids if hasattr(x, "input_ids") else [s.input_ids for s in x]) for x in items]


def test_shard_bytes_are_stable_and_round_trip():
    samples = [("000000000", {"record": {"id": "a"}, "num_tokens": 3}), ("000000001", {"record": {"id": "é"}})]
    blob = shard_bytes(samples)
    assert blob == shard_bytes(samples)
    assert list(read_shard(blob)) == [s for _, s in samples]


def test_stream_order_is_deterministic_and_resumes_at_a_position(prepared, processor):
    def stream():
        return ShardStream(prepared, "train", shuffle_buffer=5).configure(processor, batch_size=3)

    first = [x for _, x in zip(range(40), stream(), strict=False)]  # > 1 epoch: epochs repeat
    assert _ids(first) == _ids(x for _, x in zip(range(40), stream(), strict=False))
    resumed = stream()
    resumed.load_state_dict({"items": 17})
    assert _ids(x for _, x in zip(range(23), resumed, strict=False)) == _ids(first[17:])
    assert resumed.state_dict()["items"] == 40
    epoch0 = [s[0]["record"]["id"] for _, s in zip(range(stream().num_samples()), stream().plan(), strict=False)]
    assert sorted(epoch0) == sorted(r.id for r in stream().records())  # each sample once per epoch


def test_cache_stays_within_its_byte_budget_and_serves_the_same_samples(prepared, processor):
    plain = ShardStream(prepared, "train", shuffle_buffer=5, epochs=2).configure(processor)
    budget = 200_000  # a few image/audio samples' worth: the cache must evict
    cached = ShardStream(prepared, "train", shuffle_buffer=5, epochs=2, cache_bytes=budget).configure(processor)
    a, b = list(plain), list(cached)
    assert [x.input_ids for x in a] == [x.input_ids for x in b]
    assert all(torch.equal(p, q) for x, y in zip(a, b, strict=True) for p, q in zip(x.pixel_values, y.pixel_values,
                                                                                   strict=True))
    assert not plain._cache and 0 < cached._cached_bytes <= budget
    assert cached._cached_bytes == sum(size for _, size in cached._cache.values())
    assert len(cached._cache) < cached.num_samples()  # it evicted


def test_ranks_split_the_samples(prepared, processor):
    def ids(rank: int) -> list[str]:
        s = ShardStream(prepared, "train", epochs=1).configure(processor, rank=rank, world_size=3)
        return [item[0]["record"]["id"] for item in s.plan()]

    parts = [ids(r) for r in range(3)]
    everything = [r.id for r in ShardStream(prepared, "train").records()]
    assert sorted(sum(parts, [])) == sorted(everything)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("packing", [False, True])
def test_dataloader_workers_give_the_same_batches_as_one_process(prepared, processor, packing):
    from functools import partial

    from model.data.packing import collate_packed

    collate = partial(collate_packed, processor) if packing else processor.collate

    def batches(workers: int) -> list[torch.Tensor]:
        s = ShardStream(prepared, "train", shuffle_buffer=4).configure(processor, batch_size=2, packing=packing)
        s.load_state_dict({"items": 3})
        loader = DataLoader(s, batch_size=2, collate_fn=collate, num_workers=workers)
        return [b["input_ids"] for _, b in zip(range(6), loader, strict=False)]

    one, two = batches(0), batches(2)
    assert len(one) == len(two) == 6
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_packed_rows_fit_and_cover_the_epoch(prepared, processor, tiny_cfg):
    s = ShardStream(prepared, "train", epochs=1).configure(processor, batch_size=2, packing=True)
    rows = list(s.plan())
    assert all(sum(x["num_tokens"] for x in row) <= tiny_cfg.max_seq_len for row in rows)
    assert len(rows) < s.num_samples()
    assert sorted(x["record"]["id"] for row in rows for x in row) == sorted(r.id for r in s.records())


def test_filters_and_stale_processor(prepared, processor, tiny_cfg):
    s = ShardStream(prepared, "train", ["caption"], exclude_ids={"img-0", "img-1"})
    assert {r.task for r in s.records()} == {"caption"}
    assert not {"img-0", "img-1"} & {r.id for r in s.records()}
    other = OmniProcessor(train_tokenizer(["a different corpus entirely"] * 10, 300), tiny_cfg)
    with pytest.raises(StaleShardsError, match="re-run `omni data prep`"):
        ShardStream(prepared, "train").configure(other)
    with pytest.raises(ValueError, match="another data set"):
        ShardStream(prepared, "train").load_state_dict({"items": 3, "manifest_sha256": "0" * 64})


def test_corrupted_shard_is_refused(prepared, tmp_path, processor):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[520] ^= 0x20  # one flipped bit inside the first sample's JSON
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 does not match the manifest"):
        list(ShardStream(copy, "train").records())


@pytest.mark.parametrize("packing", [False, True])
def test_train_stage_streams_shards_and_resumes_bit_for_bit(prepared, processor, tiny_cfg, tmp_path, packing):
    stage = StageConfig(name="s", trainable=["vision_projector", "audio_projector", "llm"], lr=1e-3,
                        data_tasks=["caption", "asr", "text_qa"], steps=4, micro_batch_size=2, grad_accum=2,
                        checkpoint_every=2, zero_stage=1, packing=packing)

    def run(ckpt: Path):
        torch.manual_seed(0)
        model = OmniModel(tiny_cfg, len(processor.tok), processor.placeholder_ids)
        stream = ShardStream(prepared, "train", stage.data_tasks, shuffle_buffer=4)
        return train_stage(model, processor, stream, stage, checkpoint_dir=ckpt, progress=False)

    full = run(tmp_path / "a")
    assert len(full.losses) == 4 and all(np.isfinite(full.losses))
    (tmp_path / "a" / "latest").write_text("step-2")  # as if killed after the step-2 checkpoint
    resumed = run(tmp_path / "a")
    assert resumed.resumed_step == 2
    assert resumed.losses == full.losses
