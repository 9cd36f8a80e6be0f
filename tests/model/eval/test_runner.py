"""The benchmark runner on a tiny real checkpoint: every fixture format end to end, CircularEval
expansion, option log-likelihood, media limits as failures, resume after a kill, rank shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components.config import load_config
from components.reports.html import text_table
from components.steps.evaluation import evaluate_checkpoint
from model import runtime
from model.eval.loglik import answer_logprobs
from model.nn.generation import OmniChat
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor
from pipelines.cli import main
from tests.model.eval import fixtures

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_cfg, tokenizer) -> Path:
    torch.manual_seed(0)
    processor = OmniProcessor(tokenizer, tiny_cfg)
    return OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).save_pretrained(
        tmp_path_factory.mktemp("ckpt"), tokenizer)


def _cfg(tmp_path: Path, data: dict[str, Path], *extra: str):
    names = ",".join(data)
    return load_config([f"benchmark=[{names}]", *(f"benchmark.{n}.data={p}" for n, p in data.items()),
                        f"run.workdir={tmp_path / 'work'}", "evaluation.bootstrap=50", "evaluation.batch_size=4",
                        *extra])


def test_every_fixture_through_the_runner(tmp_path: Path, checkpoint: Path) -> None:
    data = fixtures.write_all(tmp_path / "data")
    cfg = _cfg(tmp_path, data)
    summary = evaluate_checkpoint(cfg, checkpoint, tmp_path / "out", progress=False)
    print("\n" + text_table(summary))  # the benchmark x metric table (pytest -s shows it)
    results = summary["benchmarks"]
    assert set(results) == set(data)
    expected_items = {"mmbench_en": 6, "mmlu": 2, "mvbench": 1, "videomme": 1, "textvqa": 1, "docvqa": 1,
                      "chartqa": 1, "ocrbench": 2, "fleurs_en": 1, "fleurs_zh": 1, "wenetspeech_net": 1,
                      "librispeech_clean": 1, "covost2_en_zh": 1}
    assert {n: r["items"] for n, r in results.items()} == expected_items
    assert results["mmbench_en"]["n"] == 2  # 4 + 2 rotations of 2 questions, scored per question
    read_failures = {n: r["read_failures"] for n, r in results.items() if r["read_failures"]}
    assert read_failures == {"mmbench_en": 1, "mmlu": 1, "mvbench": 2, "textvqa": 1, "fleurs_en": 1,
                             "wenetspeech_net": 1, "covost2_en_zh": 1}
    for name, r in results.items():
        assert r["metric"] == cfg.benchmark[name].metric and len(r["data_sha256"]) == 64
        assert 0.0 <= r["value"] <= (100.0 if r["metric"] == "bleu" else 10.0)
        assert len(summary["failures"][name]) == r["read_failures"] + r["failed"]
    assert "tok:zh" in results["covost2_en_zh"]["signature"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == sum(expected_items.values())
    mmlu = [x for x in lines if x["benchmark"] == "mmlu"]
    assert all(x["prediction"] in x["choices"] and x["letter"] == x["prediction"] for x in mmlu)  # log-likelihood
    assert {x["id"] for x in lines if x["benchmark"] == "mmbench_en"} == {"1", "1#r1", "1#r2", "1#r3", "2", "2#r1"}


def test_option_loglikelihood_equals_the_model_loss(checkpoint: Path) -> None:
    chat = OmniChat.load(checkpoint)
    prompt = ChatInput(messages=[{"role": "user", "content": "What color is the shape?\\nA. red\\nB. blue"}])
    (scores,) = answer_logprobs(chat, [prompt], [["A", "B"]])
    for letter, score in zip("AB", scores, strict=True):
        conv = ChatInput(messages=[*prompt.messages, {"role": "assistant", "content": letter}])
        batch = chat.processor.collate([chat.processor.encode(conv)])
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            loss = chat.model(**batch).loss  # mean next-token loss over the answer turn
        assert score == pytest.approx(-float(loss) * n, rel=1e-4)


def test_media_over_the_benchmark_limits_is_a_failed_item(tmp_path: Path, checkpoint: Path) -> None:
    path = fixtures.videomme_json(tmp_path)
    cfg = _cfg(tmp_path, {"videomme": path}, "+benchmark.videomme.limits.max_video_seconds=1")
    summary = evaluate_checkpoint(cfg, checkpoint, tmp_path / "out", progress=False)
    r = summary["benchmarks"]["videomme"]
    assert r["failed"] == 1 and r["value"] == 0.0
    (failure,) = summary["failures"]["videomme"]
    assert "video too long" in failure["reason"] and "benchmark.videomme.limits.max_video_seconds" in failure["reason"]


def _text_qa(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": f"q{i:03d}", "question": f"What is {i} plus one?", "answers": [str(i + 1)]}
            for i in range(n)]
    path = root / "text_qa.json"
    path.write_text(json.dumps(rows))
    return path


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_resume_after_a_kill(tmp_path: Path, checkpoint: Path, capsys) -> None:
    data = _text_qa(tmp_path / "data", 24)
    work = tmp_path / "work"
    args = ["eval", "run", "--benchmark", "omni_tiny_text_qa", "--data", str(data), "--model-dir", str(checkpoint),
            "evaluation.batch_size=2", "+benchmark.omni_tiny_text_qa.generation.max_new_tokens=48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args, "--out", str(tmp_path / "killed"),
                             f"run.workdir={work}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((work / "eval-cache").rglob("part-*.jsonl")):
        assert proc.poll() is None, "the evaluation ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = list((work / "eval-cache").rglob("part-*.jsonl"))
    answered_before = sum(len(p.read_text().splitlines()) for p in parts)
    assert 0 < answered_before < 24

    assert main([*args, "--out", str(tmp_path / "resumed"), f"run.workdir={work}"]) == 0
    resumed = _last_json(capsys.readouterr().out)["omni_tiny_text_qa"]
    assert resumed["cached"] == answered_before and resumed["answered"] == 24 - answered_before
    assert main([*args, "--out", str(tmp_path / "fresh"), f"run.workdir={tmp_path / 'other'}"]) == 0
    fresh = _last_json(capsys.readouterr().out)["omni_tiny_text_qa"]
    assert fresh["answered"] == 24 and fresh["value"] == resumed["value"]

    def predictions(out: str) -> list[tuple[str, str]]:
        rows = [json.loads(x) for x in (tmp_path / out / "predictions.jsonl").read_text().splitlines()]
        return [(r["id"], r["prediction"]) for r in rows]

    assert predictions("resumed") == predictions("fresh")  # greedy answers: the same with or without the kill


def test_ranks_answer_their_shard_and_the_primary_scores_all(tmp_path: Path, checkpoint: Path,
                                                             monkeypatch) -> None:
    data = _text_qa(tmp_path / "data", 6)
    cfg = _cfg(tmp_path, {"omni_tiny_text_qa": data})

    def as_rank(rank: int, world: int) -> None:
        # patched, not set through RANK/WORLD_SIZE: a process group another test left up would win
        monkeypatch.setattr(runtime, "ranks", lambda env=None: runtime.Ranks(rank, rank, world))

    as_rank(1, 2)
    assert evaluate_checkpoint(cfg, checkpoint, tmp_path / "rank1", progress=False) is None
    as_rank(0, 2)
    sharded = evaluate_checkpoint(cfg, checkpoint, tmp_path / "rank0", progress=False)["benchmarks"]
    r = sharded["omni_tiny_text_qa"]
    assert r["items"] == 6 and r["answered"] == 3  # rank 0 answered items 0, 2, 4; rank 1's came from its parts
    as_rank(0, 1)
    whole = evaluate_checkpoint(_cfg(tmp_path / "single", {"omni_tiny_text_qa": data}), checkpoint,
                                tmp_path / "single", progress=False)["benchmarks"]["omni_tiny_text_qa"]
    assert whole["answered"] == 6 and whole["value"] == r["value"]
