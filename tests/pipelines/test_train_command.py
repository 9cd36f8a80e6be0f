"""`omni train STAGE --data --init --out`: one stage outside the DAG, alone and under torchrun with 2
gloo ranks; the last line is the JSON contract (steps, final_loss, weights_sha256 of the checkpoint)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A small prepared data set (image and text questions) and a fresh checkpoint of the tiny model."""
    from components.config import load_config
    from components.steps.training import init_model
    from model.data.prep import prepare

    root = tmp_path_factory.mktemp("train-cmd")
    src = root / "raw"
    src.mkdir()
    lines = []
    for i, (name, rgb) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 6):
        Image.new("RGB", (32 + i, 32), rgb).save(src / f"{i}.png")
        lines.append({"id": f"img-{i}", "task": "image_mcq", "images": [f"{i}.png"], "messages": [
            {"role": "user", "content": f"<image>Which color? ({i})"}, {"role": "assistant", "content": name}]})
        lines.append({"id": f"txt-{i}", "task": "text_qa", "messages": [
            {"role": "user", "content": f"Say {name} {i}"}, {"role": "assistant", "content": name}]})
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    overrides = [f"run.workdir={root / 'work'}", "stages.sft.steps=3", "stages.sft.micro_batch_size=2",
                 "stages.sft.warmup_steps=0"]
    cfg = load_config(overrides)
    prepare([src], root / "prepared", cfg.data, cfg.model, progress=False)
    init_model(cfg, root / "prepared", root / "init")
    return root / "prepared", root / "init", overrides


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result: dict, out: Path) -> None:
    assert result["steps"] == 3 and result["final_loss"] > 0
    files = sorted(out.glob("model*.safetensors*"))  # one file at this size, or shards and their index
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    assert files and result["weights_sha256"] == digest.hexdigest()


def test_one_process(prepared, tmp_path):
    data, init, overrides = prepared
    out = tmp_path / "out"
    _check(_run([sys.executable, "-m", "pipelines.cli", "train", "sft", "--data", str(data), "--init", str(init),
                 "--out", str(out), *overrides]), out)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_under_torchrun(prepared, tmp_path, zero):
    """ZeRO-3: built partitioned (zero.Init), trained, gathered and saved by rank 0."""
    data, init, overrides = prepared
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "pipelines.cli"]
    _check(_run([*launcher, "train", "sft", "--data", str(data), "--init", str(init), "--out", str(out),
                 *overrides, f"stages.sft.zero_stage={zero}"]), out)


def test_unknown_stage_and_missing_checkpoint_are_clear_errors(prepared, tmp_path, capsys):
    from pipelines.cli import main

    data, init, overrides = prepared
    assert main(["train", "sfx", "--data", str(data), "--init", str(init), "--out", str(tmp_path), *overrides]) == 2
    assert "unknown stage 'sfx'" in capsys.readouterr().err
    assert main(["train", "sft", "--data", str(data), "--init", str(tmp_path), "--out", str(tmp_path), *overrides]) == 2
    assert "not an omni checkpoint" in capsys.readouterr().err
