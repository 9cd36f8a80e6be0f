"""Ranks that hold different media in a step stay in lock-step: every rank runs every kind's encoder
once per micro-batch, in the same order (all of a kind's items in one call, a dummy input where its
batch has none, contributing 0 x its output), so ZeRO-3's parameter gathers and ZeRO-2's gradient
buckets pair up. Two gloo ranks under torch.distributed.run, holding a demo-like mixture (tiles,
video frames and audio windows differing per rank; a text-only rank; padded then packed batches; see
_mixed_worker.py), end with the weights of one process that accumulates the same micro-batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("_mixed_worker.py")
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run(args: list[str], timeout: float = 240) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env |= {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    try:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:  # a collective that never pairs up hangs: that is the bug
        pytest.fail(f"timed out after {timeout} s (ranks out of step?):\n{(err.stdout or b'')[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("zero", [2, 3])
def test_ranks_with_different_media_train_like_one_process(tmp_path, zero):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", _port()]
    _run([*launcher, str(WORKER), "--zero", str(zero), "--out", str(tmp_path / "ranks.pt")])
    _run([str(WORKER), "--zero", str(zero), "--reference", "--out", str(tmp_path / "one.pt")])
    ranks, one = torch.load(tmp_path / "ranks.pt")["after"], torch.load(tmp_path / "one.pt")
    before, one = one["before"], one["after"]
    assert ranks.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(ranks[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    # The steps moved every trainable module (the video projector only from rank 0's frames in step 2)
    # and not the frozen audio encoder, whose projector learned from its output.
    moved = {n.split(".")[0] for n in one if not torch.equal(one[n], before[n])}
    assert moved == {"vision_tower", "vision_projector", "video_projector", "audio_projector", "llm"}
