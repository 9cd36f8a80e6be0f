"""Where this process runs, decided in one place: its rank among the launched processes, the device
it computes on, the dtype of its weights and the LLM's attention kernel.

Training, the SFT filter, evaluation, export and the predictor all ask here, so a GPU node runs
each of them in bf16 on CUDA and a CPU machine in fp32, and one launcher's environment (torchrun,
the DeepSpeed launcher, a Kubeflow Trainer pod: RANK, LOCAL_RANK, WORLD_SIZE) means the same to
every reader. The rank functions never import torch, so light steps (registry, gate) stay light.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def primary(self) -> bool:
        """Global rank 0 (or a lone process): the one that records runs and writes checkpoints."""
        return self.rank == 0


def ranks(env: Mapping[str, str] | None = None) -> Ranks:
    """This process's place in a distributed launch: the launcher's environment (torchrun, the
    DeepSpeed launcher and Trainer pods set RANK/LOCAL_RANK/WORLD_SIZE, and `init_distributed` sets
    them for a lone process); without it, an initialised process group; else rank 0 of 1."""
    env = os.environ if env is None else env
    dist = sys.modules.get("torch.distributed")  # only asked when torch is already loaded
    if "RANK" not in env and dist is not None and dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), int(env.get("LOCAL_RANK") or 0), dist.get_world_size())
    return Ranks(int(env.get("RANK") or 0), int(env.get("LOCAL_RANK") or 0), int(env.get("WORLD_SIZE") or 1))


@functools.cache
def device() -> torch.device:
    """This rank's GPU (`cuda:LOCAL_RANK`) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", ranks().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@functools.cache
def dtype() -> torch.dtype:
    """Weights and activations: bf16 where the GPU supports it, fp32 on the CPU (bf16 matmuls on a
    CPU are slow, and the bit-exact resume tests need fp32)."""
    import torch

    return torch.bfloat16 if device().type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def flash_attention_available() -> bool:
    """transformers' own check (package, version and GPU), so our choice and its dispatch agree."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    return dtype() == torch.bfloat16 and bool(is_flash_attn_2_available())


def loader_workers(configured: int | None) -> int:
    """`data.loader_workers` resolved: as configured, else 4 per process on a GPU (bounded by the CPUs
    each rank of the node gets) and 0 on a CPU, where workers would only compete with training."""
    if configured is not None:
        return configured
    if device().type != "cuda":
        return 0
    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(0, min(4, per_rank - 1))


def place(module: torch.nn.Module) -> torch.nn.Module:
    """`module` on this process's device in its dtype (bf16 on a GPU, fp32 on the CPU)."""
    return module.to(device=device(), dtype=dtype())


def varlen_available() -> bool:
    """torch's own FlashAttention varlen kernel (`torch.nn.attention.varlen`, torch >= 2.10) on a
    half-precision GPU."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return dtype() in (torch.bfloat16, torch.float16)


def attention_kernel(choice: str) -> str:
    """Resolve `model.attn_implementation`. "auto": the flash-attn package where it can run, else
    torch's varlen kernel on a bf16 GPU (model.nn.attention), else sdpa (every CPU)."""
    if choice != "auto":
        return choice
    if flash_attention_available():
        return "flash_attention_2"
    return "varlen" if varlen_available() else "sdpa"
