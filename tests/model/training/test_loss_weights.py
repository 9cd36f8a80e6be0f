"""The training loop's loss weighs every label token of an optimizer step alike, whatever micro-batch
or rank holds it: micro-batches of different lengths (one rank) and ranks with different token
counts (two gloo ranks under torch.distributed.run) move the weights exactly as one batch holding all
their tokens does. The step is plain SGD at lr 1, so the weights move by minus the gradient."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.training import optim
from tests.model.training import _loss_weight_worker as worker

REPO = Path(__file__).resolve().parents[3]
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _assert_step_is_minus(grad: dict[str, torch.Tensor], result: dict) -> None:
    before, after = result["before"], result["after"]
    assert grad.keys() == after.keys()
    for name, g in grad.items():
        torch.testing.assert_close(before[name] - after[name], g, atol=2e-6, rtol=1e-4, msg=name)


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[n], b[n], atol=1e-4, rtol=1e-3) for n in a)


def test_micro_batches_of_different_lengths_weigh_each_token_alike(monkeypatch):
    monkeypatch.setattr(optim, "adamw", worker.sgd)
    config = optim.deepspeed_config
    monkeypatch.setattr(optim, "deepspeed_config", lambda s: {**config(s), "zero_allow_untested_optimizer": True})
    micro_batches = worker.SPLIT[0]  # 1 answer word, then 12 + 2
    whole = worker.reference([i for mb in micro_batches for i in mb])
    # The test can fail: averaging the two micro-batch means gives another gradient.
    assert _differs(worker.unweighted(micro_batches), whole["grad"])
    result = worker.one_step(micro_batches, zero=2)
    _assert_step_is_minus(whole["grad"], result)
    assert result["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_ranks_with_different_token_counts_weigh_each_token_alike(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env |= {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(worker.__file__)), "--out", str(tmp_path / "ranks.pt")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    everything = [i for rank in sorted(worker.SPLIT) for mb in worker.SPLIT[rank] for i in mb]
    whole = worker.reference(everything)
    per_rank = [worker.reference([i for mb in worker.SPLIT[r] for i in mb])["grad"] for r in sorted(worker.SPLIT)]
    mean_of_ranks = {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in whole["grad"]}
    assert _differs(mean_of_ranks, whole["grad"])  # what averaging each rank's own mean would give
    result = torch.load(tmp_path / "ranks.pt")
    _assert_step_is_minus(whole["grad"], result)
    assert result["loss"] == pytest.approx(whole["loss"], rel=1e-5)
