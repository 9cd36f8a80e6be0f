"""One training stage through DeepSpeed: freeze all but the stage's modules, per-module learning
rates, warmup + cosine, gradient clipping, ZeRO stage from config, checkpoints.

On CPU DeepSpeed runs with the gloo backend (DS_ACCELERATOR=cpu); on GPU the same code uses NCCL.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from model.config import MODULES, StageConfig
from model.modeling import OmniModel
from model.packing import collate_packed, pack, packed_tokens
from model.processor import OmniProcessor


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    tokens: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Single-process defaults so DeepSpeed works outside a launcher; a multi-process launcher's
    env (torchrun, the deepspeed launcher, a Trainer TrainJob) is kept as it is."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # A fresh port every time: an inherited MASTER_PORT may still be held by the parent process.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def set_trainable(model: OmniModel, modules: list[str]) -> int:
    """Freeze everything, then unfreeze the named modules. Returns the trainable parameter count."""
    model.requires_grad_(False)
    for name in modules:
        getattr(model, name).requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model: OmniModel, stage: StageConfig) -> list[dict]:
    groups = []
    for name in MODULES:
        params = [p for p in getattr(model, name).parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": stage.lr_overrides.get(name, stage.lr), "name": name})
    return groups


def warmup_cosine(stage: StageConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def deepspeed_config(stage: StageConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.grad_clip,
        "zero_optimization": {"stage": stage.zero_stage},
        "bf16": {"enabled": torch.cuda.is_available() and torch.cuda.is_bf16_supported()},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def train_stage(
    model: OmniModel,
    processor: OmniProcessor,
    dataset,
    stage: StageConfig,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place for `stage.steps` optimizer steps over `dataset` (sampled with
    replacement, seeded). Returns the loss per step."""
    init_distributed()
    import deepspeed
    from tqdm import tqdm

    torch.manual_seed(stage.seed)
    result = TrainResult(trainable_params=set_trainable(model, stage.trainable))
    optimizer = torch.optim.AdamW(param_groups(model, stage), weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(stage)
    )
    generator = torch.Generator().manual_seed(stage.seed)
    micro_steps = stage.steps * stage.grad_accum
    collate = processor.collate
    if stage.packing:  # the items become packed rows (bins of samples); micro_batch_size counts rows
        dataset = pack([dataset[i] for i in range(len(dataset))], model.cfg.max_seq_len)
        collate = partial(collate_packed, processor)
    loader = DataLoader(
        dataset, batch_size=stage.micro_batch_size, collate_fn=collate,
        sampler=RandomSampler(dataset, replacement=True, num_samples=micro_steps * stage.micro_batch_size,
                              generator=generator),
    )
    engine.train()
    start, window = time.perf_counter(), []
    bar = tqdm(total=stage.steps, desc=f"train {stage.name}", disable=not progress, unit="step")
    for micro, batch in enumerate(loader):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        result.tokens += (packed_tokens(batch, processor.tok.pad_token_id) if stage.packing
                          else int(batch["attention_mask"].sum()))
        window.append(loss.item())
        if (micro + 1) % stage.grad_accum == 0:
            step = (micro + 1) // stage.grad_accum
            result.losses.append(sum(window) / len(window))
            window = []
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            if on_step:
                on_step(step, result.losses[-1])
            if checkpoint_dir and stage.checkpoint_every and step % stage.checkpoint_every == 0:
                engine.save_checkpoint(str(checkpoint_dir), tag=f"step-{step}")
    bar.close()
    result.seconds = time.perf_counter() - start
    if stage.zero_stage == 3:
        # ZeRO-3 partitions parameters: gather them back so the caller's model holds full weights.
        state = engine._zero3_consolidated_16bit_state_dict()
        model.load_state_dict(state, strict=False)
    engine.destroy()
    model.eval()
    return result
