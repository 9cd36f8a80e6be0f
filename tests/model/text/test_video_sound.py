"""A video with its sound: per frame (here one per second), the frame's tokens, then that second's
audio tokens; the model splices the sound's encoder outputs at exactly those positions."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model.media.inputs import ChatInput
from model.nn.omni import OmniModel
from model.text.processor import OmniProcessor

SR = 16000


def _video(seconds: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (60 * s, 0, 0)) for s in range(seconds)]


def _sample(seconds: int, sound: np.ndarray | None, content: str = "<video>what is said?") -> ChatInput:
    rng = np.random.default_rng(0)
    audios = [0.1 * rng.standard_normal(SR).astype(np.float32) for _ in range(content.count("<audio>"))]
    return ChatInput(messages=[{"role": "user", "content": content}, {"role": "assistant", "content": "red"}],
                     videos=[_video(seconds)], video_times=[[float(s) for s in range(seconds)]],
                     video_audios=[sound], audios=audios)


def _runs(ids: list[int], p: OmniProcessor) -> list[tuple[str, int]]:
    """The video's span as (what, count) runs: "2s" text, frame pads, audio markers and pads."""
    names = {i: f"{kind}_{part}" for kind, triple in p.media_ids.items()
             for part, i in zip(("start", "pad", "end"), triple, strict=True)}
    span = ids[ids.index(p.media_ids["video"][0]) + 1 : ids.index(p.media_ids["video"][2])]
    runs: list[tuple[str, int]] = []
    for i in span:
        name = names.get(i, "text")
        if runs and runs[-1][0] == name and name.endswith("pad"):
            runs[-1] = (name, runs[-1][1] + 1)
        else:
            runs.append((name, 1))
    return runs


def test_each_seconds_frame_tokens_then_its_audio_tokens(tiny_cfg, tokenizer):
    p = OmniProcessor(tokenizer, tiny_cfg)
    wave = 0.1 * np.random.default_rng(1).standard_normal(4 * SR).astype(np.float32)
    enc = p.encode(_sample(4, wave))
    # 4 s of sound = 400 mel frames; an audio token per 2 * projector_stride = 8 of them, dealt out by
    # the frame its start falls in: tokens starting at 0..96 -> 13 in second 0, 104..192 -> 12, ...
    assert p.audio_multiple == 8
    per_second = [13, 12, 13, 12]
    frame = tiny_cfg.vision.tokens_per_frame
    runs = [r for r in _runs(enc.input_ids, p) if r[0] != "text"]
    expected = [r for n in per_second for r in (("video_pad", frame), ("audio_start", 1), ("audio_pad", n),
                                                ("audio_end", 1))]
    assert runs == expected
    text = tokenizer.decode([i for i in enc.input_ids if i not in p.placeholder_ids.values()])
    assert "0s" in text and "3s" in text  # each frame's time is still written before its tokens
    assert [w.shape[1] for w in enc.audio_mel] == [400] and len(enc.video_pixel_values) == 4


def test_without_sound_the_video_is_encoded_as_before(tiny_cfg, tokenizer):
    p = OmniProcessor(tokenizer, tiny_cfg)
    frames_only = p.encode(_sample(3, None))
    legacy = p.encode(ChatInput(messages=_sample(3, None).messages, videos=[_video(3)]))
    assert frames_only.input_ids == legacy.input_ids and not frames_only.audio_mel
    assert [name for name, _ in _runs(frames_only.input_ids, p) if name != "text"] == ["video_pad"] * 3


def test_sound_past_the_last_frame_goes_to_it_and_long_sound_spans_windows(tiny_cfg, tokenizer):
    p = OmniProcessor(tokenizer, tiny_cfg)
    frames = 2
    wave = np.zeros(int(31.5 * SR), np.float32)  # two Whisper windows: 3000 + 150 mel frames
    enc = p.encode(_sample(frames, wave))
    counts = [n for name, n in _runs(enc.input_ids, p) if name == "audio_pad"]
    assert [w.shape[1] for w in enc.audio_mel] == [3000, 144]
    assert counts == [13, 375 - 13 + 18] and sum(counts) == p.audio_tokens(enc.audio_mel)


def test_the_model_splices_each_kind_in_token_order(tiny_cfg, tokenizer):
    """A standalone clip before the video and one after: the audio windows, in order, fill the audio
    placeholders in order, so each second's audio positions get that second's encoder outputs."""
    torch.manual_seed(0)
    p = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), p.placeholder_ids).eval()
    wave = 0.1 * np.random.default_rng(2).standard_normal(3 * SR).astype(np.float32)
    enc = p.encode(_sample(3, wave, "<audio>hear this<video>and this<audio>what is said?"))
    assert len(enc.audio_mel) == 3  # the first clip, the video's sound, the last clip
    batch = p.collate([enc])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], video_pixel_values=batch["video_pixel_values"],
                             audio_mel=batch["audio_mel"], audio_frames=batch["audio_frames"])[0]
        clips = model.encode("audio", batch["audio_mel"], batch["audio_frames"])
        frames = model.encode("video", batch["video_pixel_values"]).flatten(0, 1)
        out = model(**batch)
    ids = batch["input_ids"][0]
    audio_at = (ids == p.placeholder_ids["audio"]).nonzero().flatten()
    assert [len(c) for c in clips] == [12, 37, 12]
    assert torch.equal(embeds[audio_at], torch.cat(clips))
    video_audio = audio_at[12:49]  # the video's sound: between its first and last frame's tokens
    video_at = (ids == p.placeholder_ids["video"]).nonzero().flatten()
    assert video_at[0] < video_audio[0] and video_audio[-1] > video_at[-1]
    assert torch.equal(embeds[video_at], frames)
    assert torch.isfinite(out.loss) and out.logits.shape[1] == len(enc.input_ids)


def test_packed_samples_keep_each_ones_sound_at_its_own_positions(tiny_cfg, tokenizer):
    """Packing a clip-only sample after a video with sound: the audio windows still follow token order."""
    from model.data.packing import collate_packed

    torch.manual_seed(0)
    p = OmniProcessor(tokenizer, tiny_cfg)
    model = OmniModel(tiny_cfg, len(tokenizer), p.placeholder_ids).eval()
    wave = 0.1 * np.random.default_rng(3).standard_normal(2 * SR).astype(np.float32)
    heard = p.encode(_sample(2, wave))
    clip = p.encode(ChatInput(messages=[{"role": "user", "content": "<audio>what is said?"},
                                        {"role": "assistant", "content": "red"}],
                              audios=[0.1 * np.ones(SR // 2, np.float32)]))
    batch = collate_packed(p, [[heard, clip]])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], video_pixel_values=batch["video_pixel_values"],
                             audio_mel=batch["audio_mel"], audio_frames=batch["audio_frames"])[0]
        own = [model.encode("audio", *(b[k] for k in ("audio_mel", "audio_frames")))
               for b in (p.collate([heard]), p.collate([clip]))]
    audio_at = (batch["input_ids"][0] == p.placeholder_ids["audio"]).nonzero().flatten()
    assert len(audio_at) == 25 + 6
    assert torch.allclose(embeds[audio_at], torch.cat([*own[0], *own[1]]), atol=1e-5)
