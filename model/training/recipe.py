"""One training stage through DeepSpeed: freeze all but the stage's modules, per-module learning
rates, warmup + cosine, gradient clipping, ZeRO stage from config, checkpoints.

On CPU DeepSpeed runs with the gloo backend (DS_ACCELERATOR=cpu); on GPU the same code uses NCCL.

Checkpoints (every `checkpoint_every` steps, and at the step boundary after a SIGTERM)
hold model, optimizer, scheduler, the step, the losses so far and every RNG state. The data order
is drawn up front from the seeded generator, so a resumed run skips the consumed prefix and
continues bit-for-bit where the interrupted one stopped (on CPU).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from model.config import MODULES, StageConfig
from model.modeling import OmniModel
from model.packing import collate_packed, pack, packed_tokens
from model.processor import OmniProcessor
from model.shards import ShardStream


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    tokens: int = 0
    resumed_step: int = 0  # the checkpoint step this run continued from (0: a fresh start)


log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the shell's code for "terminated", so a retry policy re-runs us


class Preempted(SystemExit):
    """Raised after the checkpoint that follows a SIGTERM. Uncaught, it exits the process with
    PREEMPTED_EXIT_CODE and no traceback; the next run with the same checkpoint_dir resumes."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


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
        "bf16": {"enabled": torch.cuda.is_available() and torch.cuda.is_bf16_supported()},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "sampler": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["sampler"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _sigterm_flag(enabled: bool) -> Iterator[threading.Event]:
    """While training, SIGTERM only sets a flag: the loop checkpoints at the next step boundary."""
    flag = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Every rank must take part in a (collective) save, so a signal seen by one rank stops all."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(value: float, device: torch.device) -> float:
    """Each rank trains on its own share of the data: the loss to report is the global batch's."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def _gather_zero3(model: OmniModel) -> dict[str, torch.Tensor]:
    """Full copies of ZeRO-3's partitioned parameters, on every rank. Each gather is a collective that
    every rank joins (DeepSpeed's consolidated state dict would leave ranks > 0 with nothing), so any
    rank can go on to save or evaluate the trained model."""
    import deepspeed

    full = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[name] = p.data.detach().clone()
    return full


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
    replacement, seeded). Returns the loss per step. With `checkpoint_dir`, resumes from its latest
    checkpoint if there is one, and checkpoints into it (raising Preempted after a SIGTERM)."""
    init_distributed()
    import deepspeed
    from tqdm import tqdm

    torch.manual_seed(stage.seed)
    result = TrainResult(trainable_params=set_trainable(model, stage.trainable))
    model.set_activation_checkpointing(stage.activation_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, stage), weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(stage)
    )
    # --- data source: streamed shards (model/shards.py) or an in-memory list of Encoded samples ---
    streaming = isinstance(dataset, ShardStream)
    collate = partial(collate_packed, processor, explicit_mask=not model.varlen) if stage.packing else processor.collate
    if stage.packing and not streaming:  # the items become packed rows (bins of samples); micro_batch_size counts rows
        dataset = pack([dataset[i] for i in range(len(dataset))], model.cfg.max_seq_len)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per_rank = stage.steps * stage.grad_accum * stage.micro_batch_size
    # The whole index sequence up front, so a resumed run can skip exactly the consumed prefix. Every
    # rank draws the same sequence and takes its own slice: ranks train on different samples.
    generator = torch.Generator().manual_seed(stage.seed)
    order = [] if streaming else list(RandomSampler(dataset, replacement=True, generator=generator,
                                                    num_samples=per_rank * world))[rank::world]
    # --- end data source ---
    done, data_state = 0, {}
    if checkpoint_dir and (Path(checkpoint_dir) / "latest").is_file():
        path, client = engine.load_checkpoint(str(checkpoint_dir))
        state = client["train_state"]
        done, result.losses, result.tokens = state["step"], state["losses"], state["tokens"]
        _set_rng_state(state["rng"], generator)
        data_state = state.get("data") or {}
        result.resumed_step = done
        log.info("resumed from %s at step %d/%d", path, done, stage.steps)

    consumed = done * stage.grad_accum * stage.micro_batch_size
    if streaming:  # the reader splits by rank and worker and skips the consumed prefix by itself
        dataset.configure(processor, batch_size=stage.micro_batch_size, packing=stage.packing, seed=stage.seed)
        dataset.load_state_dict({**data_state, "items": consumed})  # refuses another data set's position
        loader = DataLoader(dataset, batch_size=stage.micro_batch_size, collate_fn=collate,
                            num_workers=dataset.num_workers)
    else:
        loader = DataLoader(dataset, batch_size=stage.micro_batch_size, collate_fn=collate, sampler=order[consumed:])
    loader = islice(loader, (per_rank - consumed) // stage.micro_batch_size)  # a stream never ends by itself
    engine.train()
    start, window = time.perf_counter(), []
    bar = tqdm(total=stage.steps, initial=done, desc=f"train {stage.name}", disable=not progress, unit="step")
    with _sigterm_flag(enabled=checkpoint_dir is not None) as sigterm:
        for micro, batch in enumerate(loader, start=done * stage.grad_accum):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            result.tokens += (packed_tokens(batch, processor.tok.pad_token_id) if stage.packing
                              else int(batch["attention_mask"].sum()))
            window.append(loss.item())
            if (micro + 1) % stage.grad_accum:
                continue
            step = (micro + 1) // stage.grad_accum
            result.losses.append(_mean_over_ranks(sum(window) / len(window), engine.device))
            window = []
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            if on_step:
                on_step(step, result.losses[-1])
            if checkpoint_dir is None:
                continue
            stop = _any_rank(sigterm.is_set(), engine.device)
            if stop or (stage.checkpoint_every and step % stage.checkpoint_every == 0):
                engine.save_checkpoint(str(checkpoint_dir), tag=f"step-{step}", client_state={"train_state": {
                    "step": step, "losses": list(result.losses),
                    "tokens": result.tokens, "rng": _rng_state(generator),
                    "data": {**dataset.state_dict(), "items": step * stage.grad_accum * stage.micro_batch_size}
                    if streaming else None}})
            if stop:
                log.warning("SIGTERM: saved checkpoint step-%d in %s; stopping (exit code %d), rerun to resume",
                            step, checkpoint_dir, PREEMPTED_EXIT_CODE)
                bar.close()
                engine.destroy()
                raise Preempted(step)
    bar.close()
    result.seconds = time.perf_counter() - start
    full = _gather_zero3(model) if stage.zero_stage == 3 else None
    engine.destroy()
    if full is not None:
        for name, p in model.named_parameters():
            p.data = full[name]
    model.eval()
    return result
