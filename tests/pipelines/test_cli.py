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
