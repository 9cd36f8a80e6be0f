"""The stage's start checkpoint, built once where it will train.

Building the model in fp32 on the host and handing it to DeepSpeed costs every rank the whole model
in host memory (~35 GB x 8 ranks on one node at paper size) before anything is partitioned. Here:

- ZeRO-3: the model is built under `deepspeed.zero.Init`, so each parameter is partitioned as its
  module is created; the weights are then read one tensor at a time and each is gathered, filled
  on rank 0 and re-partitioned, so a rank holds about its shard, not the model.
- ZeRO-0/1/2: every rank needs every weight on its device anyway; the model is built directly on
  that device in the training dtype (bf16 on a GPU), and the weights are copied in one tensor at a
  time from the memory-mapped checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from model import runtime
from model.config import ModelConfig, StageConfig
from model.nn import checkpoint
from model.nn.omni import OmniModel
from model.training.distributed import init_distributed
from model.training.optim import deepspeed_config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_for_stage(path: str | Path, stage: StageConfig) -> OmniModel:
    """The omni checkpoint at `path` as a model ready for `deepspeed.initialize` under `stage`."""
    init_distributed()
    meta = checkpoint.read_meta(path)
    cfg, vocab, media_ids = ModelConfig(**meta["model"]), meta["vocab_size"], meta["media_token_ids"]
    # No random initialisation: every weight is overwritten from the checkpoint (and under zero.Init
    # transformers' post-init would run on already partitioned, empty parameters).
    if stage.zero_stage == 3:
        import deepspeed

        # The dtype comes from the config's bf16 section (DeepSpeed 0.19 ignores an explicit `dtype` on an
        # accelerator without fp16: it would pick bf16 on the CPU). No global F.linear override either.
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(stage), mem_efficient_linear=False), \
                no_init_weights():
            model = OmniModel(cfg, vocab, media_ids)
    else:
        with torch.device(runtime.device()), _default_dtype(runtime.dtype()), no_init_weights():
            model = OmniModel(cfg, vocab, media_ids)
    load_into(model, path, partitioned=stage.zero_stage == 3)
    return model


def load_into(model: OmniModel, path: str | Path, partitioned: bool = False) -> None:
    """Copy the checkpoint's tensors into `model`'s parameters and buffers, one tensor at a time.
    `partitioned`: ZeRO-3 parameters, each gathered for the copy and filled on rank 0. Every
    parameter must be in the checkpoint (a tied LM head is the embedding)."""
    from safetensors import safe_open

    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    loaded = set()
    with safe_open(str(Path(path) / checkpoint.WEIGHTS_FILE), framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            target = targets.get(name)
            if target is None:
                continue  # an untied copy of a tied weight: the parameter it equals is loaded already
            _copy(target, lambda n=name: f.get_tensor(n), partitioned)
            loaded.add(name)
    missing = sorted(set(dict(model.named_parameters())) - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks parameters of its model: {missing[:5]}")


def _copy(target: torch.Tensor, read, partitioned: bool) -> None:
    if not (partitioned and hasattr(target, "ds_id")):
        with torch.no_grad():
            target.copy_(read())
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([target], modifier_rank=0), torch.no_grad():
        if runtime.ranks().rank == 0:
            target.copy_(read())
