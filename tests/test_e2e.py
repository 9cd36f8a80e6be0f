"""The whole DAG on the tiny model, then the served champion over HTTP, then a worse candidate
that must not take the champion's place. Real kfp.local, real MLflow (sqlite), real predictor."""

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import requests

from components.config import load_config
from components.registry import tracking
from components.steps.lifecycle import mlflow_uri
from pipelines.demo import ANSI, HOST, TASK_LINE
from pipelines.local import run_local

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

SMALL = [
    "data.demo_images=48", "data.demo_videos=16", "data.demo_audios=24", "data.demo_texts=8",
    "stages.image_1.steps=8", "stages.image_2.steps=8", "stages.image_3.steps=8", "stages.video.steps=8",
    "stages.audio.steps=8", "stages.omni_align.steps=8", "stages.sft.steps=8", "evaluation.max_samples=24",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`omni demo` as a user runs it, its output a pipe (not a terminal): what it prints is the console."""
    work = tmp_path_factory.mktemp("omni")
    overrides = [*SMALL, f"run.workdir={work}"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--keep-serving", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    serving = re.search(r"Serving: +http://127\.0\.0\.1:(\d+) \(pid (\d+)\)", out)
    result = {"stdout": out, "port": int(serving.group(1)), "pid": int(serving.group(2)),
              "champion": re.search(r"serving champion v(\d+)", out).group(1),
              "answers": re.findall(r"^  (\w+) +expected .* answered (.*)$", out, flags=re.MULTILINE)}
    yield load_config(overrides), work, result
    os.kill(result["pid"], signal.SIGTERM)


def test_the_console_through_a_pipe_shows_progress_answers_and_where_to_look(demo):
    out = demo[2]["stdout"]
    assert "\x1b[" not in out and "\r" not in out  # plain lines, no colour codes or redrawn bars
    for task in ("resolve-config", "data-prep", "image-1", "sft-loss-filter", "sft", "evaluate", "register"):
        assert f"started '{task}'" in out and f"'{task}' finished with status SUCCESS" in out, task
    assert re.search(r"sft: step \d+/8", out) and "sft: step 8/8" in out  # training progress per stage
    assert len(demo[2]["answers"]) == 3 and "Where to look:" in out and "Benchmarks" in out


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
    assert next(root.rglob("evaluate/results/report.html")).read_text().count("<img") >= 2
    stage_report = next(p for p in root.rglob("sft/report") if p.is_file())
    assert stage_report.read_text().count("<img") == 1  # each stage's loss curve
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
    the 'before' column is the initial checkpoint (its own task, evaluate-initial)."""
    _, work, _ = demo
    summary = json.loads(next((work / "pipeline_root").rglob("evaluate/results/metrics.json")).read_text())
    assert set(summary["benchmarks"]) == {"omni_tiny_image_mcq", "omni_tiny_video_mcq", "omni_tiny_ocr",
                                          "omni_tiny_count", "omni_tiny_caption", "omni_tiny_spoken_vqa",
                                          "omni_tiny_text_qa", "omni_tiny_asr"}
    assert all(r["items"] > 0 and r["failed"] == 0 for r in summary["benchmarks"].values())
    assert summary["before"]["source"] == "initial checkpoint"
    assert summary["benchmarks"]["omni_tiny_asr"]["metric"] == "wer"


def test_served_champion_answers_chat_and_v2(demo):
    cfg, work, result = demo
    assert [task for task, _ in result["answers"]] == ["image_mcq", "asr", "video_mcq"]
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


# Every task that does not talk to MLflow (pipelines/dag.UNCACHED): what kfp.local's cache may reuse.
CACHEABLE = {"resolve-config", "data-prep", "init-model", "image-1", "image-2", "image-3", "video", "audio",
             "omni-align", "sft-loss-filter", "sft", "evaluate-initial", "evaluate", "export-triton"}
AFTER_SFT = {"sft", "evaluate", "export-triton"}


def _rerun(cfg, work, capfd, overrides: list[str]) -> tuple[set[str], set[str], dict]:
    """The demo's pipeline again in the same workdir (so the same kfp.local cache), `overrides` as the
    run's `overrides` parameter. Returns the tasks reused from the cache, the tasks run, the outputs."""
    capfd.readouterr()
    outputs = run_local(cfg, work / "demo-data", overrides=overrides)
    events = list(TASK_LINE.finditer(ANSI.sub("", "".join(capfd.readouterr()))))  # the demo console's own parser
    return {m["cached"] for m in events if m["cached"]}, {m["started"] for m in events if m["started"]}, outputs


def test_an_unchanged_rerun_reuses_every_cacheable_task(demo, capfd):
    cfg, work, _ = demo
    cached, ran, outputs = _rerun(cfg, work, capfd, [])
    assert cached == CACHEABLE and not (ran & CACHEABLE), (cached, ran)
    assert {"register", "gate"} <= ran and int(outputs["version"]) > 1  # the registry still hears of the run


def test_a_diverged_sft_rerun_reruns_only_sft_onwards_and_the_gate_rejects_it(demo, capfd):
    """`overrides=["stages.sft.lr=0.5", ...]` as run parameters (what the KFP UI's run form sends): every
    task before sft is reused, sft and the tasks downstream of it run again, and the diverged candidate
    takes the gate's Else branch. The demo's benchmarks have a handful of items each, so its default
    noise margin would forgive almost anything; an exact gate (noise_z=0) rejects any drop."""
    cfg, work, _ = demo
    uri, name = mlflow_uri(cfg), cfg.tracking.registered_model
    champion_before = tracking.get_alias_version(uri, name, tracking.CHAMPION).version
    cached, ran, outputs = _rerun(cfg, work, capfd, ["stages.sft.lr=0.5", "promotion.noise_z=0"])
    assert cached == CACHEABLE - AFTER_SFT - {"resolve-config"}, cached
    assert AFTER_SFT | {"resolve-config"} <= ran, ran  # resolve-config: its overrides input changed
    assert outputs["verdict"] == "reject"
    champion = tracking.get_alias_version(uri, name, tracking.CHAMPION)
    challenger = tracking.get_alias_version(uri, name, tracking.CHALLENGER)
    assert champion.version == champion_before and str(challenger.version) == str(outputs["version"])
    assert challenger.tags["promotion.decision"] == "rejected"
