"""The stage's start checkpoint, built once where it will train.

Building the model in fp32 on the host and handing it to DeepSpeed costs every rank the whole model
in host memory (~35 GB x 8 ranks on one node at paper size) before anything is partitioned. Here:

- ZeRO-3: the model is built under `deepspeed.zero.Init`, so each parameter is partitioned as its
  module is created; the weights are then read one tensor at a time and each is gathered, filled
  on rank 0 and re-partitioned, so a rank holds about its shard, not the model.
- ZeRO-0/1/2: every rank needs every weight anyway; the model is built on the meta device and each
  tensor read straight into place in the training dtype (model.nn.loading: one copy of the
  weights, in bf16 on a GPU node), then handed to DeepSpeed, which moves it to the rank's GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from model import runtime
from model.config import ModelConfig, StageConfig
from model.nn import checkpoint
from model.nn.loading import TensorFiles
from model.nn.omni import OmniModel
from model.training.distributed import init_distributed
from model.training.optim import deepspeed_config


def build_for_stage(path: str | Path, stage: StageConfig) -> OmniModel:
    """The omni checkpoint at `path` as a model ready for `deepspeed.initialize` under `stage`."""
    init_distributed()
    if stage.zero_stage != 3:
        return OmniModel.from_pretrained(path, dtype=runtime.dtype())
    import deepspeed

    meta = checkpoint.read_meta(path)
    # The dtype comes from the config's bf16 section (DeepSpeed 0.19 ignores an explicit `dtype` on an
    # accelerator without fp16: it would pick bf16 on the CPU). No global F.linear override either.
    # No random initialisation: every weight is overwritten, and transformers' post-init would run on
    # already partitioned, empty parameters.
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(stage), mem_efficient_linear=False), \
            no_init_weights():
        model = OmniModel(ModelConfig(**meta["model"]), meta["vocab_size"], meta["media_token_ids"],
                          stop_token_ids=meta.get("stop_token_ids"))
    fill_partitioned(model, TensorFiles(path))
    return model


def fill_partitioned(model: OmniModel, files: TensorFiles) -> None:
    """Copy the checkpoint's tensors into a ZeRO-3-partitioned model: each parameter is gathered (a
    collective every rank joins, in the same order), filled on rank 0 and re-partitioned; buffers are
    copied on every rank. Every parameter must be in the checkpoint (a tied weight is stored once)."""
    import deepspeed

    stored = set(files.keys)
    params = dict(model.named_parameters())
    if missing := sorted(set(params) - stored):
        raise ValueError(f"checkpoint {files.folder} lacks parameters of its model: {missing[:5]}")
    primary = runtime.ranks().rank == 0
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if primary:
                param.copy_(next(files.read([name]))[1])
    for name, buffer in model.named_buffers():
        if name in stored:
            with torch.no_grad():
                buffer.copy_(next(files.read([name]))[1])
