"""Trains the tiny model for a few steps (images and text, ZeRO-2, packed or padded) and prints the
trained checkpoint's weights_sha256, for tests/model/training/test_reproducible.py, which runs it in
fresh processes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

from PIL import Image  # noqa: E402

from model.config import StageConfig  # noqa: E402
from model.nn.checkpoint import weights_sha256  # noqa: E402
from model.text.processor import ChatInput  # noqa: E402
from model.training.recipe import train_stage  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--packing", action="store_true")
    args = ap.parse_args()
    _, tokenizer, processor, model = tiny_model("what color is the shape red green blue yellow say")
    samples = [processor.encode(ChatInput(
        messages=[{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": c}],
        images=[Image.new("RGB", (48, 48), rgb)])) for c, rgb in COLORS.items()]
    samples += [processor.encode(ChatInput(messages=[{"role": "user", "content": f"say {c} " * (i + 1)},
                                                     {"role": "assistant", "content": c}]))
                for i, c in enumerate(COLORS)]
    stage = StageConfig(name="repro", trainable=["vision_tower", "vision_projector", "llm"], lr=3e-3,
                        data_tasks=["x"], steps=3, micro_batch_size=2, grad_accum=2, warmup_steps=1,
                        packing=args.packing, seed=7)
    train_stage(model, processor, samples, stage, progress=False)
    model.save_pretrained(args.out, tokenizer)
    print(weights_sha256(args.out))


if __name__ == "__main__":
    main()
