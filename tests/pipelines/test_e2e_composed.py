"""The whole DAG (real kfp.local, MLflow on sqlite) on tiny, starting from composed Hugging Face
parts instead of fresh weights: data prep tokenises with the LLM's own tokenizer and chat template,
init-model composes the checkpoint from model.init, every stage trains from it, and the register /
gate steps see a plain checkpoint (one stage trains the LLM through LoRA, merged before export)."""

import json

import pytest

from components.config import load_config
from model.data.demo import make_demo
from model.text.tokenizer import load_tokenizer
from pipelines.local import run_local
from tests.hf_parts import make_parts

pytestmark = pytest.mark.slow

TRAINED = ("image_1", "audio", "sft")  # the projector, the audio tower, the LLM through LoRA; the rest pass through
SKIPPED = "run.skip_stages=[image_2,image_3,video,omni_align]"
STEPS = [f"stages.{s}.steps=2" for s in TRAINED]


def test_dag_from_composed_parts(tmp_path):
    parts = make_parts(tmp_path / "parts")
    cfg = load_config([
        *STEPS, SKIPPED, f"run.workdir={tmp_path / 'work'}", "data.demo_images=12", "data.demo_videos=4",
        "data.demo_audios=6", "data.demo_texts=4", "evaluation.max_samples=6", "+stages.sft.lora.rank=4",
        "evaluation.baseline=none",  # the demo e2e evaluates the initial model; here it would only add time
        *(f"model.init.{p}={folder}" for p, folder in parts.items()),
    ])
    make_demo(tmp_path / "data", cfg.data, progress=False)
    result = run_local(cfg, tmp_path / "data")
    root = tmp_path / "work" / "pipeline_root"
    report = json.loads(next(root.rglob("compose_report.json")).read_text())
    print("init-model compose report:", json.dumps({p: report[p] for p in ("llm", "vision", "audio", "projectors")}))
    assert all(report[p]["source"] == str(parts[p]) and report[p]["tensors_loaded"] > 0 for p in parts)
    assert report["vision"]["new_parameters"] == report["audio"]["new_parameters"] == 0
    prepared = load_tokenizer(next(root.rglob("dataset/tokenizer")))
    assert prepared.get_vocab() == load_tokenizer(parts["llm"]).get_vocab()  # the LLM's own tokenizer, not a BPE
    losses = json.loads(max(root.rglob("model/losses.json"), key=lambda p: len(p.read_text())).read_text())
    assert list(losses) == list(TRAINED)
    print("e2e from composed parts: losses", {k: [round(v, 3) for v in vs] for k, vs in losses.items()},
          "evaluation", result["evaluation"]["overall"])
    scores = [b["value"] for b in result["evaluation"]["benchmarks"].values()]
    assert scores and all(v == v for v in scores)  # evaluated: finite numbers, no NaN
    assert result["verdict"] in ("promote", "reject") and int(result["version"]) >= 1
