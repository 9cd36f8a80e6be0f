"""Every reader on a fixture in its benchmark's on-disk format: the items it yields, and a failure
with its reason for every row it cannot use."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import load_config
from model.config import BenchmarkConfig
from model.eval.items import BenchItem
from model.eval.readers import read_benchmark
from model.media.decode import load_audio, load_image, load_video_frames
from tests.model.eval import fixtures


def spec(name: str, *overrides: str) -> BenchmarkConfig:
    return load_config([f"benchmark=[{name}]", *overrides]).benchmark[name]


def ids(items: list[BenchItem]) -> list[str]:
    return [i.id for i in items]


def test_vlmeval_tsv_mmbench(tmp_path: Path) -> None:
    data = read_benchmark(spec("mmbench_en"), fixtures.vlmeval_tsv(tmp_path))
    assert ids(data.items) == ["1", "2"]
    q1, q2 = data.items
    assert q1.choices == {"A": "red", "B": "blue", "C": "green", "D": "yellow"} and q1.answers == ["A"]
    assert q2.choices == {"A": "square", "B": "circle"}  # "nan" and empty options are not options
    assert q2.hint == "The image shows one shape."
    assert q2.images == q1.images and load_image(q2.images[0]).size == (32, 32)  # image by reference to row 1
    assert q1.category == {"category": "attribute", "l2-category": "perception"} and q1.lang == "en"
    assert [(f.id, "no answer key" in f.reason) for f in data.failures] == [("3", True)]
    assert len(data.sha256) == 64


def test_vlmeval_tsv_circular_copies(tmp_path: Path) -> None:
    path = fixtures.vlmeval_tsv(tmp_path, circular_copies=True)
    circular = read_benchmark(spec("mmbench_en"), path)
    assert [(i.id, i.group) for i in circular.items] == [("1", "1"), ("2", "2"), ("1000001", "1")]
    vanilla = read_benchmark(spec("seed_img"), path)  # circular off: the copies are not questions of their own
    assert ids(vanilla.items) == ["1", "2"]


def test_mmlu_csv_with_and_without_header(tmp_path: Path) -> None:
    data = read_benchmark(spec("mmlu"), fixtures.mmlu_folder(tmp_path))
    by_id = {i.id: i for i in data.items}
    assert set(by_id) == {"abstract_algebra-1", "chinese_history-0"}
    assert by_id["abstract_algebra-1"].choices["B"] == "4" and by_id["abstract_algebra-1"].answers == ["B"]
    assert by_id["chinese_history-0"].question == "秦朝的首都是哪里？"
    assert by_id["chinese_history-0"].category == {"subject": "chinese_history"}
    assert [f.id for f in data.failures] == ["abstract_algebra-2"] and "columns" in data.failures[0].reason


def test_video_mcq_json_mvbench_and_videomme(tmp_path: Path) -> None:
    mv = read_benchmark(spec("mvbench"), fixtures.mvbench_folder(tmp_path))
    assert len(mv.items) == 1
    item = mv.items[0]
    assert item.choices == {"A": "the colour", "B": "the shape"} and item.answers == ["A"]
    assert item.category == {"task": "action_sequence"}
    frames, _ = load_video_frames(item.videos[0], 1.0, 8)
    assert len(frames) == 2
    reasons = sorted(f.reason for f in mv.failures)
    assert "media not found" in reasons[1] and "not one of the candidates" in reasons[0]

    vm = read_benchmark(spec("videomme"), fixtures.videomme_json(tmp_path))
    (q,) = vm.items
    assert q.id == "001-1" and q.choices == {"A": "1", "B": "2", "C": "3", "D": "4"} and q.answers == ["C"]
    assert q.category == {"duration": "short", "task_type": "Counting Problem"} and q.videos[0].name == "abc123.mp4"


def test_vqa_json_textvqa_docvqa_chartqa(tmp_path: Path) -> None:
    tv = read_benchmark(spec("textvqa"), fixtures.textvqa_json(tmp_path))
    (q,) = tv.items
    assert q.id == "7" and len(q.answers) == 10 and load_image(q.images[0]).size == (32, 32)
    assert [f.id for f in tv.failures] == ["8"]
    (doc,) = read_benchmark(spec("docvqa"), fixtures.docvqa_json(tmp_path)).items
    assert doc.id == "11" and doc.answers == ["Annual Report", "annual report 2019"] and doc.images[0].is_file()
    (chart,) = read_benchmark(spec("chartqa"), fixtures.chartqa_json(tmp_path)).items
    assert chart.question == "What is the peak value?" and chart.answers == ["42"] and chart.images[0].is_file()


def test_ocrbench_json(tmp_path: Path) -> None:
    data = read_benchmark(spec("ocrbench"), fixtures.ocrbench_json(tmp_path))
    assert [i.answers for i in data.items] == [["STOP"], ["x ^ { 2 }"]]
    assert data.items[1].category == {"type": "Handwritten Mathematical Expression Recognition", "dataset": "HME100k"}


def test_asr_manifests(tmp_path: Path) -> None:
    jsonl = read_benchmark(spec("fleurs_en"), fixtures.asr_jsonl(tmp_path))
    assert [i.answers for i in jsonl.items] == [["I do not know"]]
    assert load_audio(jsonl.items[0].audios[0]).size == 8000
    assert "media not found" in jsonl.failures[0].reason

    fleurs = read_benchmark(spec("fleurs_zh"), fixtures.fleurs_tsv(tmp_path))
    (utt,) = fleurs.items
    assert utt.answers == ["这 是 2012 年 的 事"] and utt.lang == "zh" and utt.audios[0].is_file()

    kaldi = read_benchmark(spec("wenetspeech_net"), fixtures.kaldi_folder(tmp_path))
    assert ids(kaldi.items) == ["U0001"] and kaldi.items[0].answers == ["他于二零一二年来到台湾"]
    assert "pipes" in kaldi.failures[0].reason

    libri = read_benchmark(spec("librispeech_clean"), fixtures.librispeech_folder(tmp_path))
    (utt,) = libri.items
    assert utt.id == "1089-134686-0000" and utt.answers[0].startswith("HE HOPED")
    assert load_audio(utt.audios[0]).size == pytest.approx(8000, abs=1200)  # flac decodes to 0.5 s


def test_covost2_tsv(tmp_path: Path) -> None:
    data = read_benchmark(spec("covost2_en_zh"), fixtures.covost2_tsv(tmp_path))
    (utt,) = data.items
    assert utt.answers == ["我喜欢这只猫"] and utt.lang == "zh" and utt.audios[0].name == "common_voice_en_1.mp3"
    assert load_audio(utt.audios[0]).size > 4000
    assert [f.id for f in data.failures] == ["common_voice_en_2"]


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_benchmark(spec("textvqa"), tmp_path / "nope.json")


def test_every_registry_entry_validates() -> None:
    names = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "conf" / "benchmark").glob("*.yaml"))
    cfg = load_config([f"benchmark=[{','.join(names)}]"])
    assert sorted(cfg.benchmark) == names
    assert cfg.benchmark["mmbench_en"].circular and cfg.benchmark["mmlu"].scoring == "loglikelihood"
    assert cfg.benchmark["fleurs_zh"].metric == "cer" and cfg.benchmark["fleurs_en"].metric == "wer"
