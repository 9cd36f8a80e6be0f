"""The KFP data_prep component's own function (what the task pod runs), with real kfp artifact
objects on local paths and a real MLflow (sqlite): its metrics, the dataset's metadata and the HTML
report it hands the KFP UI."""

from __future__ import annotations

import json
import re

import torch
from kfp.dsl import HTML, Dataset, Metrics

from components.config import load_config
from components.pipeline_components import make_components
from components.registry.records import read_record
from components.slices import task_slice
from tests.components.raw_corpus import chat_record, write_media

torch.set_num_threads(1)


def test_data_prep_component_logs_balanced_metrics_and_writes_the_report(tmp_path):
    src = write_media(tmp_path / "in")
    (src / "data.jsonl").write_text("\n".join([
        chat_record("img", "<image>Color?", "red", images=["red.png"]),
        chat_record("aud", "<audio>Transcribe.", "noise", audios=["a.wav"]),
        chat_record("txt", "2 plus 2?", "4"),
        chat_record("bad", "<image>Color?", "red", images=["bad.png"]),
        chat_record("gone", "<image>Color?", "red", images=["missing.png"]),
        "{oops",
    ]) + "\n")

    cfg = load_config([f"run.workdir={tmp_path / 'work'}", "data.val_fraction=0.5"])
    ops = make_components({"cpu": "cpu-image", "gpu": "gpu-image"})
    dataset = Dataset(name="dataset", uri=str(tmp_path / "artifacts" / "dataset"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "artifacts" / "metrics"))
    report = HTML(name="report", uri=str(tmp_path / "artifacts" / "report.html"))

    extra = tmp_path / "extra.jsonl"  # a second input: the pipeline parameter is comma-separated
    extra.write_text(chat_record("more", "3 plus 3?", "6") + "\n")
    sha = ops.data_prep.python_func(config_json=task_slice(cfg, "data-prep"), data_uri=f"{src}, {extra},",
                                    dataset=dataset, metrics=metrics, report=report)

    manifest = json.loads((tmp_path / "artifacts" / "dataset" / "manifest.json").read_text())
    assert sha == manifest["sha256"]
    m = metrics.metadata
    assert m["records_in"] == 7 and m["records_out"] == 4 and m["records_quarantined"] == 3
    assert m["records_in"] == m["records_out"] + m["records_quarantined"]
    assert m["quarantined.bad_image"] == 1 and m["quarantined.missing_media"] == 1
    assert m["quarantined.malformed_JSON"] == 1
    assert dataset.metadata["records_out"] == 4 and dataset.metadata["sha256"] == sha

    html = (tmp_path / "artifacts" / "report.html").read_text()
    table = re.search(r"<table><tr><th>reason</th><th>records</th></tr>(.*?)</table>", html)
    assert table, "no per-reason quarantine table in the report"
    rows = dict(re.findall(r"<tr><td>([^<]+)</td><td class='num'>(\d+)</td></tr>", table.group(1)))
    assert rows == {"bad image": "1", "missing media": "1", "malformed JSON": "1"}
    assert 'alt="quarantine reasons" src="data:image/png;base64,' in html
    assert html.count('src="data:image/png;base64,') >= 2  # the reasons chart and the other plots
    assert "in = out + quarantined: holds" in html
    # What register logs to MLflow for this step (the step itself does not: it is cached).
    record = read_record(tmp_path / "artifacts" / "dataset")
    assert record["name"] == "data-prep" and record["metrics"]["records_in"] == 7
    assert set(record["files"]) == {"manifest.json", "quarantine.jsonl", "report.html"}
