"""A stage's model is built once where it trains: ZeRO-3 ranks hold about their shard of the weights
(built under deepspeed.zero.Init, filled tensor by tensor), ZeRO-0/1/2 build on the device in the
training dtype; either way the weights are the checkpoint's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from model.config import StageConfig
from model.nn.omni import OmniModel
from model.text.processor import ChatInput, OmniProcessor
from model.training.loading import build_for_stage

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("_build_worker.py")


def _checkpoint(tmp_path, tiny_cfg, tokenizer) -> Path:
    processor = OmniProcessor(tokenizer, tiny_cfg)
    torch.manual_seed(3)
    return OmniModel(tiny_cfg, len(tokenizer), processor.placeholder_ids).save_pretrained(tmp_path / "ckpt", tokenizer)


def test_built_model_answers_like_the_checkpoint(tmp_path, tiny_cfg, tokenizer):
    path = _checkpoint(tmp_path, tiny_cfg, tokenizer)
    stage = StageConfig(name="x", trainable=["llm"], lr=1e-3, data_tasks=["x"], steps=1, zero_stage=2)
    built, reference = build_for_stage(path, stage).eval(), OmniModel.from_pretrained(path).eval()
    processor = OmniProcessor(tokenizer, tiny_cfg)
    batch = processor.collate([processor.encode(ChatInput([{"role": "user", "content": "what color"},
                                                           {"role": "assistant", "content": "red"}]))])
    with torch.no_grad():  # the rotary tables and other buffers are right too, not only the weights
        torch.testing.assert_close(built(**batch).logits, reference(**batch).logits, atol=0, rtol=0)


def test_zero3_ranks_hold_their_shard_of_the_checkpoint(tmp_path, tiny_cfg, tokenizer):
    path = _checkpoint(tmp_path, tiny_cfg, tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(WORKER), "--checkpoint", str(path), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["equal"] for r in ranks), ranks
    for r in ranks:  # ZeRO-3 pads partitions to an even split: a shard is about half, never the whole
        assert r["held"] < 0.55 * r["total"], r
