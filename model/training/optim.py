"""What a stage optimises and how: the trainable modules, per-module learning rates, warmup + cosine,
and the DeepSpeed engine settings (ZeRO stage, clipping, accumulation, bf16)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from model import runtime
from model.config import MODULES, StageConfig
from model.nn.omni import OmniModel


def set_trainable(model: OmniModel, modules: list[str]) -> int:
    """Freeze everything, then unfreeze the named modules, except the parameters their towers keep
    fixed by design (`OmniModel.fixed_parameters`). Returns the trainable parameter count."""
    model.requires_grad_(False)
    for name in modules:
        for pname, p in getattr(model, name).named_parameters(prefix=name):
            p.requires_grad_(pname not in model.fixed_parameters)
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
        # bf16 shares fp32's exponent range: no loss scale to adjust, so DeepSpeed's per-gradient
        # inf/NaN scan before every step (a kernel per tensor and a host sync) finds nothing to act on.
        "bf16": {"enabled": runtime.dtype() == torch.bfloat16, "check_grad_overflow": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def adamw(groups: list[dict], stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step on CUDA (no per-tensor launches, no host reads of the
    step count); torch's default for-each version on the CPU."""
    return torch.optim.AdamW(groups, weight_decay=stage.weight_decay, fused=runtime.device().type == "cuda")


def build_engine(model: OmniModel, stage: StageConfig):
    """The DeepSpeed engine over `model` with only the stage's modules trainable."""
    import deepspeed

    optimizer = adamw(param_groups(model, stage), stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(stage))
    return engine
