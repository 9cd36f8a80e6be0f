"""Builds a stage's model from an omni checkpoint with model.training.loading.build_for_stage, under
torch.distributed.run, for tests/model/training/test_loading.py: writes, per rank, how many parameter
elements the rank holds and whether the gathered weights equal the checkpoint's."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from model.config import StageConfig  # noqa: E402
from model.nn.loading import TensorFiles  # noqa: E402
from model.training.distributed import gather_full_weights  # noqa: E402
from model.training.loading import build_for_stage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zero", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    stage = StageConfig(name="x", trainable=["llm"], lr=1e-3, data_tasks=["x"], steps=1, zero_stage=args.zero)
    model = build_for_stage(args.checkpoint, stage)
    held = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in model.parameters())
    full = gather_full_weights(model) if args.zero == 3 else dict(model.named_parameters())
    files = TensorFiles(args.checkpoint)
    saved = dict(files.read(files.keys))
    bad = [n for n in full if not torch.equal(full[n].cpu(), saved[n])]
    equal = not bad
    rank = torch.distributed.get_rank()
    total = sum(t.numel() for t in full.values())
    report = {"held": held, "total": total, "equal": equal, "differ": bad[:5]}
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
