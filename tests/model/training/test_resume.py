"""Checkpoint/resume of train_stage, through real processes: a run killed with SIGKILL and resumed
reproduces the uninterrupted loss curve exactly (CPU), SIGTERM checkpoints and exits with
PREEMPTED_EXIT_CODE, and two ranks under torch.distributed.run (ZeRO-2 and ZeRO-3, gloo) agree."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.training.checkpointing import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("_resume_worker.py")
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}


def _worker(out: Path, *args: str, launcher: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, *(launcher or []), str(WORKER), "--out", str(out), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, (
            f"worker exited ({proc.returncode}) before {path.name} appeared:\n{_finish(proc)[1]}"
        )
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _losses(path: Path) -> dict:
    return json.loads(path.read_text())


def test_sigkill_then_resume_reproduces_the_uninterrupted_curve(tmp_path):
    steps = ["--steps", "8", "--every", "2"]
    uninterrupted = _worker(tmp_path / "a.json", *steps)
    killed = _worker(tmp_path / "b.json", *steps, "--ckpt", str(tmp_path / "ckpt"), "--sleep", "0.4")
    _wait_for(tmp_path / "ckpt" / "latest", killed)
    killed.send_signal(signal.SIGKILL)
    assert _finish(killed)[0] == -signal.SIGKILL
    assert not (tmp_path / "b.json").exists()
    code, output = _finish(uninterrupted)
    assert code == 0, output

    code, output = _finish(_worker(tmp_path / "c.json", *steps, "--ckpt", str(tmp_path / "ckpt")))
    assert code == 0, output
    reference, resumed = _losses(tmp_path / "a.json"), _losses(tmp_path / "c.json")
    assert 0 < resumed["resumed_step"] < 8
    assert len(resumed["losses"]) == 8
    assert resumed["losses"] == reference["losses"]  # bit-for-bit, not approximately


def test_sigterm_checkpoints_at_the_step_boundary_and_exits(tmp_path):
    progress, ckpt = tmp_path / "progress", tmp_path / "ckpt"
    proc = _worker(
        tmp_path / "d.json", "--steps", "20", "--ckpt", str(ckpt), "--sleep", "0.4", "--progress", str(progress)
    )
    _wait_for(progress, proc)  # the handler is installed once the training loop runs
    proc.send_signal(signal.SIGTERM)
    code, output = _finish(proc)
    assert code == PREEMPTED_EXIT_CODE, output
    assert "SIGTERM: saved checkpoint" in output
    tag = (ckpt / "latest").read_text().strip()
    assert tag.startswith("step-") and 0 < int(tag.removeprefix("step-")) < 20
    assert (ckpt / tag).is_dir()
    assert not (tmp_path / "d.json").exists()  # train_stage did not return as if finished


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_gloo_agree_on_losses_and_end_with_the_same_full_weights(tmp_path, zero):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]
    proc = _worker(
        tmp_path / "e.json",
        "--steps",
        "4",
        "--every",
        "2",
        "--zero",
        str(zero),
        "--ckpt",
        str(tmp_path / "ckpt"),
        launcher=launcher,
    )
    code, output = _finish(proc)
    assert code == 0, output
    rank0, rank1 = _losses(tmp_path / "e.json"), _losses(tmp_path / "e.json.rank1")
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert len(rank0["losses"]) == 4 and rank0["losses"] == rank1["losses"]
    # Both ranks trained the same replica (ZeRO-3: gathered back from the partitions on each rank).
    assert rank0["initial_checksum"] == rank1["initial_checksum"]
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)
    assert rank0["checksum"] != pytest.approx(rank0["initial_checksum"], rel=1e-9)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-4"
