"""Same inputs, same weights: one training stage run twice in fresh processes (other hash seeds,
other working directories) writes checkpoints with the same weights_sha256, bit for bit, on the CPU
(model.training.recipe.reproducible says what that rests on and why a GPU run is not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("_repro_worker.py")
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _start(out: Path, hash_seed: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO),
            "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    out.parent.mkdir(parents=True)
    return subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), "--packing"], cwd=out.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digest(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return stdout.strip().splitlines()[-1]


def test_a_stage_run_twice_in_fresh_processes_writes_the_same_weights(tmp_path):
    runs = [_start(tmp_path / "one" / "ckpt", hash_seed="1"), _start(tmp_path / "two" / "ckpt", hash_seed="2")]
    first, second = map(_digest, runs)
    assert len(first) == 64 and first == second
    assert (tmp_path / "one" / "ckpt" / "model.safetensors").is_file()
