"""The omni-tiny generator: valid records, decodable media, labels that match the pixels,
reproducible output."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model.config import DataConfig
from model.data.demo import COLORS, make_demo
from model.data.records import Record
from model.media.decode import load_audio, load_image, load_video_frames

TASKS = {"caption", "image_mcq", "ocr", "count", "video_mcq", "video_color_mcq", "video_sound_mcq", "asr",
         "spoken_vqa", "text_qa"}
CFG = DataConfig(demo_images=16, demo_videos=8, demo_audios=8, demo_texts=8, demo_sound_videos=2, val_fraction=0.25,
                 seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo(out, CFG, progress=False)


def _records(out: Path) -> dict[str, list[Record]]:
    return {
        split: [
            Record.model_validate_json(line) for line in (out / f"{split}.jsonl").read_text().splitlines()
        ]
        for split in ("train", "val")
    }


def _options(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([ABCD])\. (\w+)$", prompt, flags=re.MULTILINE))


def _shape_mask(arr: np.ndarray) -> np.ndarray:
    """Pixels that are clearly not the (near-white) background."""
    return arr.astype(int).min(axis=-1) < 200


def _dominant_color(arr: np.ndarray) -> str:
    mean = arr[_shape_mask(arr)].mean(axis=0)
    return min(COLORS, key=lambda c: np.abs(mean - np.array(COLORS[c])).sum())


def test_counts_splits_and_records(demo):
    out, counts = demo
    recs = _records(out)
    assert counts == {
        "caption": 4, "image_mcq": 4, "ocr": 4, "count": 4, "video_mcq": 4, "video_color_mcq": 4,
        "video_sound_mcq": 2, "asr": 6, "spoken_vqa": 2, "text_qa": 8,
        "train": len(recs["train"]), "val": len(recs["val"]), "total": 42,
    }  # fmt: skip
    assert counts["val"] == 12  # 25 % of each task (rounded), at least one each
    ids = [r.id for split in recs.values() for r in split]
    assert len(ids) == len(set(ids)) == 42
    for split in recs.values():
        for r in split:
            assert r.task in TASKS and r.source == "omni-tiny" and r.lang == "en"
    # Each task appears in val, so evaluation covers every task.
    assert {r.task for r in recs["val"]} == TASKS


def test_media_paths_are_relative_and_decode(demo):
    out, _ = demo
    for r in (r for split in _records(out).values() for r in split):
        for p in r.images + r.videos + r.audios:
            assert not Path(p).is_absolute() and p.startswith("media/")
        for p in r.images:
            img = load_image(out / p)
            assert img.size == (64, 64)
            assert Path(p).suffix in (".png", ".jpg")
        for p in r.videos:
            frames, times = load_video_frames(out / p, fps=1.0, max_frames=48)
            assert len(frames) == 4 and times == pytest.approx([0, 1, 2, 3])
        for p in r.audios:
            audio = load_audio(out / p)
            assert 0.2 < len(audio) / 16000 < 5 and np.abs(audio).max() > 0.1
    exts = {
        Path(p).suffix for r in _records(out)["train"] + _records(out)["val"] for p in r.images if r.task == "caption"
    }
    assert exts == {".png", ".jpg"}


def test_labels_match_the_media(demo):
    out, _ = demo
    for r in (r for split in _records(out).values() for r in split):
        prompt, answer = r.messages[0].content, r.reference
        if r.task == "caption":
            arr = np.asarray(load_image(out / r.images[0]))
            assert re.fullmatch(r"a (red|green|blue|yellow) (circle|square|triangle)", answer)
            assert answer.split()[1] == _dominant_color(arr)
        elif r.task == "image_mcq":
            assert answer in "ABCD" and len(_options(prompt)) == 4
            if "color" in prompt:
                arr = np.asarray(load_image(out / r.images[0]))
                assert _options(prompt)[answer] == _dominant_color(arr)
        elif r.task == "video_mcq":
            frames, _ = load_video_frames(out / r.videos[0], fps=1.0, max_frames=48)
            (y0, x0), (y1, x1) = (np.argwhere(_shape_mask(np.asarray(f))).mean(axis=0) for f in (frames[0], frames[-1]))
            dx, dy = x1 - x0, y1 - y0
            moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert _options(prompt)[answer] == moved
        elif r.task == "video_color_mcq":
            frames, _ = load_video_frames(out / r.videos[0], fps=1.0, max_frames=48)
            when = re.search(r"at the (start|end) of the video", prompt).group(1)
            first, last = (_dominant_color(np.asarray(f)) for f in (frames[0], frames[-1]))
            assert first != last  # the colour does change between the sampled frames
            assert _options(prompt)[answer] == (first if when == "start" else last)
        elif r.task == "video_sound_mcq":
            # The picture is a moving shape; the spoken number is in the video's own sound track.
            assert r.use_audio_in_video is True and _options(prompt)[answer] in ("one", "two", "three", "four")
            sound = load_audio(out / r.videos[0])
            assert abs(len(sound) / 16000 - 4) < 0.1 and np.abs(sound).max() > 0.1
            assert prompt.startswith("<video>Which number is said")
        elif r.task == "ocr":
            assert re.fullmatch(r"\d{2,3}", answer)
            arr = np.asarray(load_image(out / r.images[0]))
            assert 20 < _shape_mask(arr).sum() < 64 * 64 // 3  # ink on the image, not a blank or filled one
        elif r.task == "count":
            assert answer in {"1", "2", "3", "4"}
            assert _blobs(_shape_mask(np.asarray(load_image(out / r.images[0])))) == int(answer)
        elif r.task == "spoken_vqa":
            assert prompt.startswith("<image><audio>") and len(r.images) == len(r.audios) == 1
            assert 0.3 < len(load_audio(out / r.audios[0])) / 16000 < 5
            if answer in COLORS:
                assert answer == _dominant_color(np.asarray(load_image(out / r.images[0])))
            else:
                assert answer in ("circle", "square", "triangle")
        elif r.task == "asr":
            assert prompt == "<audio>Transcribe the audio."
            assert re.fullmatch(r"(zero|one|two|three|four|five|six|seven|eight|nine)( \w+){0,2}", answer)
        else:
            assert not (r.images or r.videos or r.audios) and answer


def _blobs(mask: np.ndarray) -> int:
    """Connected components (4-neighbour) of a boolean mask."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_mcq_letters_vary(demo):
    out, _ = demo
    letters = {r.reference for split in _records(out).values() for r in split if r.task.endswith("mcq")}
    assert len(letters) >= 3


def test_same_seed_same_output_other_seed_differs(demo, tmp_path):
    out, _ = demo
    again = tmp_path / "again"
    make_demo(again, CFG, progress=False)
    for name in ("train.jsonl", "val.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    for f in (out / "media").iterdir():
        # Byte for byte, videos too: x264's frame threads encoded the same frames differently now
        # and then (so two demos trained on different data); the demo's encoder runs one thread.
        assert (again / "media" / f.name).read_bytes() == f.read_bytes(), f.name
    other = tmp_path / "other"
    make_demo(other, CFG.model_copy(update={"seed": 4}), progress=False)
    assert (other / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: espeak-ng cannot be found
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        make_demo(tmp_path / "d", CFG, progress=False)


def test_stage_task_lists_match_the_demo_tasks():
    from omegaconf import OmegaConf

    stages = {
        p.stem: set(OmegaConf.load(p).data_tasks)
        for p in (Path(__file__).resolve().parents[3] / "conf" / "stage").glob("*.yaml")
    }
    assert all(tasks <= TASKS for tasks in stages.values()), stages
    assert stages["sft"] == stages["omni_align"] == TASKS  # the mixed stages see every task
    assert {"ocr", "count"} <= stages["image_2"] and "video_color_mcq" in stages["video"]


def test_held_out_records_are_written_as_benchmark_files(demo):
    """The demo's evaluation goes through the benchmark readers: every held-out record is an item of
    its omni_tiny_* benchmark, with the prompt it was trained on."""
    from components.config import load_config
    from model.eval.readers import read_benchmark
    from model.eval.runner import prompt_text

    out, counts = demo
    val = _records(out)["val"]
    cfg = load_config([f"evaluation.data_root={out}"])
    seen = {}
    for name, spec in cfg.benchmark.items():
        data = read_benchmark(spec, out / spec.data)
        assert not data.failures, data.failures
        for item in data.items:
            seen[item.id] = (name, item, spec)
    assert len(seen) == len(val) == counts["val"]
    trained_prompts = sorted(r.prompt_messages[-1].content for r in val)
    assert sorted(prompt_text(item, spec) for _, item, spec in seen.values()) == trained_prompts
