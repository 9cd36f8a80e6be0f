"""The data-prep HTML report and the counts logged as KFP/MLflow metrics."""

from __future__ import annotations

from components.reports.data_prep import data_report
from components.steps.data import data_prep_metrics
from model.config import DataConfig
from model.data.prep import prepare
from tests.components.raw_corpus import chat_record, write_media


def test_report_and_metrics_from_a_real_prep_run(tmp_path, tiny_cfg):
    src, rec = write_media(tmp_path / "in"), chat_record
    (src / "data.jsonl").write_text("\n".join([
        rec("img", "<image>Color?", "red", images=["red.png"]),
        rec("aud", "<audio>Transcribe.", "noise", audios=["a.wav"]),
        rec("txt", "2 plus 2?", "4"),
        rec("<b>bad</b>", "<image>Color?", "red", images=["bad.png"]),
        "{oops",
    ]) + "\n")
    result = prepare([src], tmp_path / "out", DataConfig(val_fraction=0.5), tiny_cfg, progress=False)

    html = data_report(result.manifest, result.quarantined, result.stats)
    assert html.count("<img") == 3  # quarantine reasons, the modality/task mix, the length histograms
    assert 'alt="quarantine reasons" src="data:image/png;base64,' in html
    assert "in = out + quarantined: holds" in html
    assert "bad image" in html and "malformed JSON" in html
    assert "<b>bad</b>" not in html and "&lt;b&gt;bad&lt;/b&gt;" in html  # ids and reasons are escaped
    assert result.stats["audio_seconds"] == [1.0] and len(result.stats["image_pixels"]) == 1

    metrics = data_prep_metrics(result.manifest)
    assert metrics["records_in"] == 5 and metrics["records_out"] == 3 and metrics["records_quarantined"] == 2
    assert metrics["split.train"] + metrics["split.val"] == 3
    assert metrics["quarantined.bad_image"] == 1 and metrics["quarantined.malformed_JSON"] == 1
    assert metrics["modality.text_only"] == 1
