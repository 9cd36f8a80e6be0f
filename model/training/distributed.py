"""The process group a stage trains in: DeepSpeed over gloo on CPU, NCCL on GPU, and the few
collectives the training loop needs besides DeepSpeed's own."""

from __future__ import annotations

import atexit
import functools
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


def leave_group_at_exit() -> None:
    """After a stage succeeded in a process that trained (`omni train`, a TrainJob rank): leave the
    process group when the interpreter exits, while it is still whole. gloo's worker threads alive at
    interpreter teardown can abort a process whose run succeeded ("terminate called without an active
    exception", SIGABRT). At exit, not now: DeepSpeed keeps the groups it was given, and a caller in
    the same process (a test calling the CLI's `main`) may train again. Only after success: a rank
    that failed may leave peers inside a collective, where a teardown would hang them."""
    atexit.register(_leave_group)


def _leave_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _many() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def any_rank(flag: bool) -> bool:
    """Every rank must take part in a (collective) save, so a signal seen by one rank stops all.
    Agreed on the host (a gloo group beside NCCL): asking every step must not wait for the GPU."""
    if not _many():
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_host_group())
    return bool(t.item())


@functools.cache
def _host_group():
    """The default group where it is gloo already, else one gloo group over the same ranks (made
    once, by every rank at the same call, as `new_group` requires)."""
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo")


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, in place on its device: an enqueued collective, no host sync."""
    if _many():
        torch.distributed.all_reduce(t)
    return t


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
