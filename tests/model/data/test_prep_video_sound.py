"""Data prep with videos heard (`use_audio_in_video`): the sound is checked under the video's limits,
the switch is part of the dedup key and is written into the prepared record."""

from __future__ import annotations

import json

from model.config import DataConfig
from model.data.loading import to_chat_input
from model.data.prep import prepare
from model.data.shards import SPLITS, ShardStream
from tests.model.media.sound import write_video_with_sound


def _rec(rid: str, video: str, **extra) -> dict:
    return {"id": rid, "task": "video_sound", "videos": [video], **extra,
            "messages": [{"role": "user", "content": "<video>What word is said?"},
                         {"role": "assistant", "content": "red"}]}


def test_sound_limits_dedup_key_and_the_prepared_switch(tmp_path, tiny_cfg):
    src = tmp_path / "in"
    src.mkdir()
    write_video_with_sound(src / "clip.mp4", seconds=2, loud_second=1)
    write_video_with_sound(src / "long_sound.mp4", seconds=2, sound_seconds=6, loud_second=0)
    lines = [_rec("heard", "clip.mp4", use_audio_in_video=True),
             _rec("seen", "clip.mp4", use_audio_in_video=False),  # same text and video, not heard: kept
             _rec("seen-by-default", "clip.mp4"),  # the model's default (off): a duplicate of "seen"
             _rec("sound-too-long", "long_sound.mp4", use_audio_in_video=True),
             _rec("long-sound-unheard", "long_sound.mp4")]
    (src / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    prepare([src], out, DataConfig(val_fraction=0.5, max_video_seconds=4), tiny_cfg, progress=False)

    reasons = {q["id"]: q["reason"] for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())}
    assert set(reasons) == {"seen-by-default", "sound-too-long"}
    assert reasons["seen-by-default"].startswith("duplicate: same text and media as record 'seen'")
    assert reasons["sound-too-long"].startswith("video too long: 'long_sound.mp4' has 6.")
    assert "data.max_video_seconds=4" in reasons["sound-too-long"]

    kept = {r.id: r for split in SPLITS for r in ShardStream(out, split).records()}
    assert {rid: r.use_audio_in_video for rid, r in kept.items()} == {
        "heard": True, "seen": False, "long-sound-unheard": False}
    heard, seen = (to_chat_input(kept[rid], out, tiny_cfg) for rid in ("heard", "seen"))
    assert heard.video_audios[0].size >= 31000 and seen.video_audios == [None]
