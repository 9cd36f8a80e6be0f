"""Two DeepSpeed optimizer steps where the ranks hold different media, for
tests/model/training/test_mixed_modalities.py. Run under torch.distributed.run with 2 processes, or
alone with --reference: one process, gradient accumulation over the same micro-batches (the global
batch data parallelism averages over). Writes the updated weights.

Like the demo mixture, the ranks differ in what each tower runs on, step by step:

    step 1, padded: rank 0  an image of 3 tiles, 1 s of audio   | rank 1  two text-only samples
    step 2, packed: rank 0  a 3-frame video, a text sample      | rank 1  a 1-tile image with 2 s of audio, 3 s of audio

The audio encoder is frozen (it runs under no_grad) while its projector trains."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model.config import StageConfig  # noqa: E402
from model.data.packing import collate_packed, pack  # noqa: E402
from model.text.processor import ChatInput, Encoded, OmniProcessor  # noqa: E402
from model.training.distributed import gather_full_weights, init_distributed  # noqa: E402
from model.training.optim import build_engine, set_trainable  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

TRAINABLE = ["vision_tower", "vision_projector", "video_projector", "audio_projector", "llm"]


def _sample(processor: OmniProcessor, question: str, answer: str, **media) -> Encoded:
    return processor.encode(ChatInput(messages=[{"role": "user", "content": question},
                                                {"role": "assistant", "content": answer}], **media))


def _audio(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, int(16000 * seconds)).astype(np.float32)


def micro_batches(processor: OmniProcessor, max_seq_len: int) -> list[list[dict]]:
    """Per step, one micro-batch per rank (rank order)."""
    s = processor.cfg.vision.image_size
    wide, square = Image.new("RGB", (2 * s, s), (255, 0, 0)), Image.new("RGB", (s, s), (0, 0, 255))
    frames = [Image.new("RGB", (s, s), (0, 60 * i, 0)) for i in range(3)]
    padded = [
        [_sample(processor, "<image><audio>what color?", "red", images=[wide], audios=[_audio(1.0, 0)]),
         _sample(processor, "say green", "green")],
        [_sample(processor, "say blue", "blue"), _sample(processor, "say yellow", "yellow")],
    ]
    packed = [
        [_sample(processor, "<video>what color?", "green", videos=[frames]), _sample(processor, "say red", "red")],
        [_sample(processor, "<image><audio>what color?", "blue", images=[square], audios=[_audio(2.0, 1)]),
         _sample(processor, "<audio>say", "yellow", audios=[_audio(3.0, 2)])],
    ]
    return [[processor.collate(samples) for samples in padded],
            [collate_packed(processor, pack(samples, max_seq_len)) for samples in packed]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--reference", action="store_true", help="one process over every rank's micro-batches")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, tokenizer, processor, model = tiny_model("what color is the shape red green blue yellow say")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    stage = StageConfig(name="mixed", trainable=TRAINABLE, lr=1e-2, data_tasks=["x"], steps=2, warmup_steps=0,
                        micro_batch_size=2, grad_accum=1 if world > 1 else 2, zero_stage=args.zero, grad_clip=0.0)
    set_trainable(model, stage.trainable)
    engine = build_engine(model, stage)
    engine.train()
    for step in micro_batches(processor, cfg.max_seq_len):
        for batch in step if args.reference else [step[rank]]:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
    full = (gather_full_weights(model) if args.zero == 3
            else {n: p.detach().clone() for n, p in model.named_parameters()})
    if rank == 0:
        torch.save({"before": initial, "after": full}, args.out)
    engine.destroy()


if __name__ == "__main__":
    main()
