"""The process group a stage trains in: DeepSpeed over gloo on CPU, NCCL on GPU, and the few
collectives the training loop needs besides DeepSpeed's own."""

from __future__ import annotations

import os
import socket

import torch

from model import runtime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Single-process defaults so DeepSpeed works outside a launcher; a multi-process launcher's
    env (torchrun, the deepspeed launcher, a Trainer TrainJob) is kept as it is."""
    on_gpu = runtime.device().type == "cuda"
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if os.environ.get("WORLD_SIZE", "1") == "1":
        # A fresh port every time: an inherited MASTER_PORT may still be held by the parent process.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    if on_gpu:
        torch.cuda.set_device(runtime.device())
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


def _many() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """Every rank must take part in a (collective) save, so a signal seen by one rank stops all."""
    if not _many():
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: float, device: torch.device) -> float:
    """Each rank trains on its own share of the data: the loss to report is the global batch's."""
    if not _many():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def gather_full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of ZeRO-3's partitioned parameters, on every rank. Each gather is a collective that
    every rank joins (DeepSpeed's consolidated state dict would leave ranks > 0 with nothing), so any
    rank can go on to save or evaluate the trained model."""
    import deepspeed

    full = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[name] = p.data.detach().clone()
    return full
