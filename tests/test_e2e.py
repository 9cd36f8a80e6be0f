"""The whole DAG on the tiny model, then the served champion over HTTP, then a worse candidate
that must not take the champion's place. Real kfp.local, real MLflow (sqlite), real predictor."""

import base64
import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import requests

from components import tracking
from components.lifecycle import mlflow_uri
from pipelines.config import load_config
from pipelines.demo import HOST, run_demo, stop
from pipelines.local import run_local

pytestmark = pytest.mark.slow

SMALL = [
    "data.demo_images=48", "data.demo_videos=16", "data.demo_audios=24", "data.demo_texts=8",
    "stages.image_1.steps=8", "stages.image_2.steps=8", "stages.image_3.steps=8", "stages.video.steps=8",
    "stages.audio.steps=8", "stages.omni_align.steps=8", "stages.sft.steps=8", "evaluation.max_samples=24",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("omni")
    cfg = load_config([*SMALL, f"run.workdir={work}"])
    result = run_demo(cfg, keep_serving=True)
    yield cfg, work, result
    stop(result["process"])


def test_every_stage_produced_its_artifacts(demo):
    _, work, _ = demo
    root = work / "pipeline_root"
    manifest = json.loads(next(root.rglob("dataset/manifest.json")).read_text())
    assert manifest["records_in"] == manifest["records_out"] + manifest["records_quarantined"]
    checkpoints = list(root.rglob("model/model.safetensors"))
    assert len(checkpoints) >= 8  # init + 7 stages
    losses = json.loads(sorted(root.rglob("model/losses.json"), key=lambda p: len(p.read_text()))[-1].read_text())
    assert list(losses) == ["image_1", "image_2", "image_3", "video", "audio", "omni_align", "sft"]
    # The loss filter scored every SFT sample before sft: each one is either kept or listed as dropped.
    summary = json.loads(next(root.rglob("sft_filter.json")).read_text())
    scored = sum(f["n"] for f in summary["fits"].values())
    assert summary["enabled"] and scored > 0 and summary["kept"] + len(summary["dropped"]) == scored
    assert next(root.rglob("results/report.html")).read_text().count("<img") >= 2
    repo = next(root.rglob("triton_repo/export_report.json")).parent
    assert {"vision_encoder", "audio_encoder", "omni"} <= {p.name for p in repo.iterdir()}


def test_exported_onnx_matches_torch(demo):
    _, work, _ = demo
    report = json.loads(next((work / "pipeline_root").rglob("triton_repo/export_report.json")).read_text())
    diffs = [c["max_abs_diff"] for graph in report["onnx"].values() for c in graph["checks"]]
    assert diffs and max(diffs) < 1e-4


def test_registry_has_champion_with_lineage(demo):
    cfg, _, result = demo
    uri = mlflow_uri(cfg)
    champion = tracking.get_alias_version(uri, cfg.tracking.registered_model, tracking.CHAMPION)
    assert champion is not None and str(champion.version) == str(result["champion"])
    for tag in tracking.LINEAGE_TAGS:
        assert champion.tags.get(tag), f"missing lineage tag {tag}"
    assert "metric.mcq_accuracy" in champion.tags and "metric.wer" in champion.tags
    # per benchmark: the score, its standard error and the data it was scored on (what the gate compares)
    assert "metric.omni_tiny_image_mcq.mcq_accuracy" in champion.tags
    assert "metric.omni_tiny_asr.wer.stderr" in champion.tags
    assert len(champion.tags["bench.omni_tiny_asr.data_sha256"]) == 64


def test_demo_evaluates_the_held_out_benchmarks(demo):
    """The evaluate step reads the demo's benchmark files through the registry's readers and metrics;
    with no champion yet, the 'before' column is the initial checkpoint."""
    _, work, _ = demo
    summary = json.loads(next((work / "pipeline_root").rglob("results/metrics.json")).read_text())
    assert set(summary["benchmarks"]) == {"omni_tiny_image_mcq", "omni_tiny_video_mcq", "omni_tiny_ocr",
                                          "omni_tiny_count", "omni_tiny_caption", "omni_tiny_spoken_vqa",
                                          "omni_tiny_text_qa", "omni_tiny_asr"}
    assert all(r["items"] > 0 and r["failed"] == 0 for r in summary["benchmarks"].values())
    assert summary["before"]["source"] == "initial checkpoint"
    assert summary["benchmarks"]["omni_tiny_asr"]["metric"] == "wer"


def test_served_champion_answers_chat_and_v2(demo):
    cfg, work, result = demo
    assert len(result["answers"]) == 3 and all(isinstance(a["answer"], str) for a in result["answers"])
    port = result["port"]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) / 8) * 8000).astype("<i2").tobytes())
    body = {"model": cfg.serving.model_name, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}},
        {"type": "text", "text": "Transcribe the audio."}]}]}
    resp = requests.post(f"http://{HOST}:{port}/openai/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["role"] == "assistant"

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"{HOST}:{port}")
    try:
        text = httpclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"What is 2 plus 3?"], dtype=object))
        out = client.infer(cfg.serving.model_name, [text]).as_numpy("text_output")
        assert out.shape == (1,)
    finally:
        client.close()


def test_malformed_request_gets_4xx(demo):
    cfg, _, result = demo
    url = f"http://{HOST}:{result['port']}/openai/v1/chat/completions"
    bad = {"model": cfg.serving.model_name, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,not-an-image"}}]}]}
    resp = requests.post(url, json=bad, timeout=30)
    assert 400 <= resp.status_code < 500 and "error" in resp.json()


def test_worse_candidate_does_not_replace_champion(demo):
    """Every stage skipped -> an untrained candidate: the gate must reject it (the Else branch). The
    demo's benchmarks have a handful of items each, so its default noise margin would forgive almost
    anything; an exact gate (noise_z=0) rejects any drop."""
    cfg, work, result = demo
    worse = load_config([*SMALL, f"run.workdir={work}", "promotion.noise_z=0",
                         "run.skip_stages=[image_1,image_2,image_3,video,audio,omni_align,sft]"])
    run_local(worse, work / "demo-data")
    uri = mlflow_uri(cfg)
    name = cfg.tracking.registered_model
    champion = tracking.get_alias_version(uri, name, tracking.CHAMPION)
    challenger = tracking.get_alias_version(uri, name, tracking.CHALLENGER)
    assert str(champion.version) == str(result["champion"])
    assert int(challenger.version) > int(champion.version)
    assert challenger.tags["promotion.decision"] == "rejected"
    assert Path(work).exists()
