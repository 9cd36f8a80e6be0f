import json

import pytest
from PIL import Image

from pipelines.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "data", "pipeline", "serve", "model", "config"):
        assert command in out


def test_bad_override_exits_2_naming_the_field(capsys):
    assert main(["config", "stages.sft.lr=-1"]) == 2
    assert "stages.sft.lr" in capsys.readouterr().err


def test_data_prep_takes_inputs_then_overrides_in_any_order(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (16, 16), "red").save(src / "a.png")
    rec = {"id": "r1", "task": "caption", "images": ["a.png"],
           "messages": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "red"}]}
    (src / "data.jsonl").write_text(json.dumps(rec) + "\n")
    assert main(["data", "prep", str(src), "--out", str(tmp_path / "out"), "data.val_fraction=0.5"]) == 0
    assert "1 in, 1 out, 0 quarantined" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["records_in"] == 1


def _lines(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_eval_score_contract(tmp_path, capsys):
    """omni eval score FILE --metric NAME [--lang en|zh] [--details OUT]: the last line is a JSON
    object whose `value` is the metric; --details has one line per item (MCQ: the letter or null)."""
    choices = {"A": "red", "B": "blue", "C": "green"}
    preds = _lines(tmp_path / "mcq.jsonl", [
        {"id": 1, "prediction": "The answer is (B)", "answers": ["B"], "choices": choices, "lang": "en"},
        {"id": 2, "prediction": "green", "answers": ["C"], "choices": choices},
        {"id": 3, "prediction": "no idea", "answers": ["A"], "choices": choices},
    ])
    assert main(["eval", "score", str(preds), "--metric", "mcq_accuracy", "--details", str(tmp_path / "d.jsonl")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["value"] == pytest.approx(2 / 3) and last["metric"] == "mcq_accuracy" and last["n"] == 3
    details = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert details == [{"id": "1", "score": 1.0, "letter": "B"}, {"id": "2", "score": 1.0, "letter": "C"},
                       {"id": "3", "score": 0.0, "letter": None}]

    asr = _lines(tmp_path / "zh.jsonl", [{"id": "u1", "prediction": "2012年", "answers": ["二零一二年"]}])
    assert main(["eval", "score", str(asr), "--metric", "cer", "--lang", "zh"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == 0.0
    en = _lines(tmp_path / "en.jsonl", [{"id": "u1", "prediction": "I don't know", "answers": ["I do not know"]}])
    assert main(["eval", "score", str(en), "--metric", "wer", "--lang", "en"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == 0.0
    vqa = _lines(tmp_path / "vqa.jsonl", [{"id": 9, "prediction": "Two", "answers": ["2"] * 3 + ["3"] * 7}])
    assert main(["eval", "score", str(vqa), "--metric", "vqa_accuracy"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == pytest.approx(0.9)
    bleu = _lines(tmp_path / "s2tt.jsonl", [{"id": 1, "prediction": "我喜欢这只猫", "answers": ["我喜欢这只猫"],
                                              "lang": "zh"}])
    assert main(["eval", "score", str(bleu), "--metric", "bleu"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["value"] == pytest.approx(100.0) and "tok:zh" in last["signature"]


def test_eval_score_bad_input_names_the_line_and_field(tmp_path, capsys):
    bad = _lines(tmp_path / "bad.jsonl", [{"id": 1, "prediction": "x", "answers": ["x"]}, {"id": 2, "prediction": "y"}])
    assert main(["eval", "score", str(bad), "--metric", "exact_match"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "answers" in err
    assert main(["eval", "score", str(tmp_path / "none.jsonl"), "--metric", "wer"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "score", str(bad), "--metric", "accuracy"])  # not a metric name: argparse lists them


def test_eval_run_names_a_missing_benchmark_or_data(tmp_path, capsys):
    assert main(["eval", "run", "--benchmark", "textvqa", "--model-dir", str(tmp_path)]) == 2
    assert "benchmark.textvqa.data" in capsys.readouterr().err
