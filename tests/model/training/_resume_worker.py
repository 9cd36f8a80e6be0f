"""Trains the tiny model for tests/model/test_resume.py: run as a subprocess (alone or under
torch.distributed.run), optionally checkpointing into --ckpt, and writes its loss curve as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model.config import StageConfig  # noqa: E402
from model.text.processor import ChatInput  # noqa: E402
from model.training.recipe import train_stage  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="loss curve JSON (rank N>0 appends .rankN)")
    ap.add_argument("--ckpt", type=Path, help="checkpoint dir: resumed from if it holds one")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=0, help="checkpoint_every")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds after each step, so a test can catch it mid-run")
    ap.add_argument("--progress", type=Path, help="file rewritten with the step number after each step")
    ap.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg, tokenizer, processor, model = tiny_model("what color is the shape red green blue yellow")
    samples = [processor.encode(ChatInput(
        messages=[{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": c}],
        images=[Image.new("RGB", (64, 64), rgb)])) for c, rgb in COLORS.items()] * 2
    # grad_accum 2: a resume must land on an optimizer-step boundary of the micro-batch stream.
    stage = StageConfig(name="resume", trainable=["vision_projector", "llm"], lr=3e-3, data_tasks=["x"],
                        steps=args.steps, micro_batch_size=2, grad_accum=2, warmup_steps=2,
                        zero_stage=args.zero, checkpoint_every=args.every)

    def on_step(step: int, loss: float) -> None:
        if args.progress:
            args.progress.write_text(str(step))
        time.sleep(args.sleep)

    def checksum() -> float:  # of the full weights: after ZeRO-3 every rank must hold all of them
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    initial = checksum()
    result = train_stage(model, processor, samples, stage, checkpoint_dir=args.ckpt, on_step=on_step,
                         progress=False)
    rank = int(os.environ.get("RANK", "0"))
    out = args.out if rank == 0 else args.out.with_name(f"{args.out.name}.rank{rank}")
    out.write_text(json.dumps({"losses": result.losses, "resumed_step": result.resumed_step, "rank": rank,
                               "initial_checksum": initial, "checksum": checksum()}))


if __name__ == "__main__":
    main()
