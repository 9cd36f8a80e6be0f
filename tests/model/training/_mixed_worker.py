"""One DeepSpeed optimizer step where the ranks see different modalities (rank 0 image samples,
rank 1 text only), for tests/model/training/test_mixed_modalities.py. Run under torch.distributed.run
with 2 processes, or alone with --reference: one process, gradient accumulation over the same two
micro-batches (the global batch data parallelism averages over). Writes the updated weights."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model.config import StageConfig  # noqa: E402
from model.text.processor import ChatInput, OmniProcessor  # noqa: E402
from model.training.distributed import gather_full_weights, init_distributed  # noqa: E402
from model.training.optim import build_engine, set_trainable  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def batches(processor: OmniProcessor) -> list[dict]:
    """Micro-batch 0: two image questions. Micro-batch 1: two text-only questions."""
    images = [processor.encode(ChatInput(
        messages=[{"role": "user", "content": "<image>what color?"}, {"role": "assistant", "content": c}],
        images=[Image.new("RGB", (64, 64), rgb)])) for c, rgb in list(COLORS.items())[:2]]
    texts = [processor.encode(ChatInput(messages=[{"role": "user", "content": f"say {c}"},
                                                  {"role": "assistant", "content": c}])) for c in list(COLORS)[2:]]
    return [processor.collate(images), processor.collate(texts)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--reference", action="store_true", help="one process over both micro-batches")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, tokenizer, processor, model = tiny_model("what color is the shape red green blue yellow say")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    init_distributed()
    world = torch.distributed.get_world_size()
    stage = StageConfig(name="mixed", trainable=["vision_tower", "vision_projector", "llm"], lr=1e-2,
                        data_tasks=["x"], steps=1, micro_batch_size=2, grad_accum=1 if world > 1 else 2,
                        zero_stage=args.zero, grad_clip=0.0)
    set_trainable(model, stage.trainable)
    engine = build_engine(model, stage)
    engine.train()
    mine = batches(processor) if args.reference else [batches(processor)[torch.distributed.get_rank()]]
    for batch in mine:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    full = (gather_full_weights(model) if args.zero == 3
            else {n: p.detach().clone() for n, p in model.named_parameters()})
    if torch.distributed.get_rank() == 0:
        torch.save({"before": initial, "after": full}, args.out)
    engine.destroy()


if __name__ == "__main__":
    main()
