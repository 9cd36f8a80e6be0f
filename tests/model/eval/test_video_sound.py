"""A benchmark's `use_audio_in_video` (Video-MME-style sets whose questions need the sound)."""

from __future__ import annotations

from types import SimpleNamespace

from model.config import BenchmarkConfig
from model.eval.items import BenchItem
from model.eval.runner import chat_input, limits_of
from tests.model.media.sound import write_video_with_sound


def test_a_benchmark_can_keep_the_videos_sound(tmp_path, tiny_cfg):
    write_video_with_sound(tmp_path / "v.mp4", seconds=2, loud_second=0)
    item = BenchItem(id="q1", question="What is said?", answers=["A"], choices={"A": "red", "B": "blue"},
                     videos=[tmp_path / "v.mp4"])
    chat = SimpleNamespace(model=SimpleNamespace(cfg=tiny_cfg))  # the runner reads only the model's config
    spec = BenchmarkConfig(title="Video-MME", family="video MCQ", reader="video_mcq_json", metric="mcq_accuracy")
    heard_spec = spec.model_copy(update={"use_audio_in_video": True})
    heard = chat_input(item, heard_spec, chat, limits_of("vmme", heard_spec))
    seen = chat_input(item, spec, chat, limits_of("vmme", spec))
    assert heard.video_audios[0].size > 16000 and seen.video_audios == [None]
    assert len(heard.videos[0]) == len(seen.videos[0]) == 2
