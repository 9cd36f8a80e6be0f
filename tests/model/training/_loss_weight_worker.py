"""One optimizer step of `model.training.recipe`'s loop over fixed micro-batches of different lengths,
for tests/model/training/test_loss_weights.py: in the test's own process (one rank, two micro-batches)
or under torch.distributed.run (two ranks holding different token counts, two micro-batches each).
The optimizer is plain SGD at lr 1, so the weights move by exactly minus the step's gradient."""

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

from model.config import StageConfig  # noqa: E402
from model.text.processor import ChatInput, Encoded, OmniProcessor  # noqa: E402
from model.training import optim  # noqa: E402
from model.training.checkpointing import Progress  # noqa: E402
from model.training.distributed import gather_full_weights, init_distributed  # noqa: E402
from model.training.recipe import StageData, _loop  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

WORDS = "what color is the shape red green blue yellow say"
# Answers of 1 to 12 words: label-token counts far apart, so an unweighted mean of means differs.
ANSWERS = ["red", "green blue yellow red green blue yellow red green blue yellow red", "blue yellow",
           "say what color the shape is red green", "yellow", "green red blue"]
# Rank -> its two micro-batches (indices into ANSWERS); one rank alone takes both ranks' lists.
SPLIT = {0: [[0], [1, 2]], 1: [[3, 4], [5]]}


def samples(processor: OmniProcessor) -> list[Encoded]:
    return [processor.encode(ChatInput(messages=[{"role": "user", "content": "say a color"},
                                                 {"role": "assistant", "content": a}])) for a in ANSWERS]


def sgd(groups: list[dict], stage: StageConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=1.0)


def one_step(micro_batches: list[list[int]], zero: int) -> dict[str, torch.Tensor]:
    """(weights before, after) of the trainable LLM after one step of `_loop` over `micro_batches`."""
    torch.set_num_threads(1)
    _, _, processor, model = tiny_model(WORDS)
    encoded = samples(processor)
    init_distributed()
    stage = StageConfig(name="w", trainable=["llm"], lr=1.0, data_tasks=["x"], steps=1, micro_batch_size=2,
                        grad_accum=len(micro_batches), zero_stage=zero, grad_clip=0.0)
    optim.set_trainable(model, stage.trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = optim.build_engine(model, stage)
    batches = iter([processor.collate([encoded[i] for i in mb]) for mb in micro_batches])
    data = StageData(dataset=None, collate=processor.collate, stage=stage)
    state = Progress()
    _loop(engine, batches, data, processor, state, None, torch.Generator(), None, progress=False)
    after = gather_full_weights(model) if zero == 3 else {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.destroy()
    return {"before": before, "after": {n: after[n] for n in before}, "loss": state.losses[0]}


def reference(indices: list[int]) -> dict:
    """The gradient and loss of one plain forward over one batch holding all of `indices`."""
    torch.set_num_threads(1)
    _, _, processor, model = tiny_model(WORDS)
    encoded = samples(processor)
    model.train()
    loss = model(**processor.collate([encoded[i] for i in indices])).loss
    loss.backward()
    return {"grad": {n: p.grad for n, p in model.llm.named_parameters(prefix="llm")}, "loss": loss.item()}


def unweighted(micro_batches: list[list[int]]) -> dict[str, torch.Tensor]:
    """The gradient of the mean of micro-batch means (the weighting this loop must not have)."""
    grads = [reference(mb)["grad"] for mb in micro_batches]
    return {n: sum(g[n] for g in grads) / len(grads) for n in grads[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zero", type=int, default=2)
    args = ap.parse_args()
    # SGD is not on DeepSpeed's list of ZeRO-tested optimizers; it is here only to read the gradient.
    config = optim.deepspeed_config
    optim.deepspeed_config = lambda stage: {**config(stage), "zero_allow_untested_optimizer": True}
    optim.adamw = sgd
    rank = int(os.environ["RANK"])
    result = one_step(SPLIT[rank], args.zero)
    if rank == 0:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
