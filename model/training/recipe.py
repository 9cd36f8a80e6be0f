"""One training stage through DeepSpeed: set up (trainable modules, engine, data), resume, loop, finish.

    result = train_stage(model, processor, ShardStream(prepared, "train", stage.data_tasks), stage,
                         checkpoint_dir=out / "deepspeed")

On CPU DeepSpeed runs with the gloo backend (DS_ACCELERATOR=cpu); on GPU the same code uses NCCL.
Checkpoints and resume: `model.training.checkpointing`.
"""

from __future__ import annotations

import random
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

from model import runtime
from model.config import StageConfig
from model.data.packing import collate_packed, pack, packed_tokens
from model.data.shards import ShardStream
from model.nn.loss import target_tokens
from model.nn.omni import OmniModel
from model.nn.plan import stage_checkpointing
from model.text.processor import OmniProcessor
from model.training import checkpointing, lora
from model.training.checkpointing import PREEMPTED_EXIT_CODE, Preempted, Progress
from model.training.distributed import any_rank, gather_full_weights, init_distributed, sum_over_ranks
from model.training.optim import build_engine, set_trainable

REPORT_EVERY = 10  # optimizer steps between loss reports (each report is one device-to-host copy)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    tokens: int = 0
    resumed_step: int = 0  # the checkpoint step this run continued from (0: a fresh start)
    # Host time spent waiting for the loader's next micro-batches: a starved accelerator shows here
    # (with no host syncs in the loop, a GPU-bound run waits in kernel launches instead).
    data_wait_seconds: float = 0.0


@dataclass
class StageData:
    """A stage's samples as batches that can start at any consumed count: the shard stream (which
    splits by rank and worker and skips a prefix itself) or an in-memory list sampled with
    replacement from a seeded generator (every rank draws the same sequence, takes its own slice)."""

    dataset: object
    collate: Callable
    stage: StageConfig
    order: list[int] = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        return isinstance(self.dataset, ShardStream)

    @property
    def per_rank(self) -> int:
        """Samples (rows, when packing) each rank consumes over the whole stage."""
        return self.stage.steps * self.stage.grad_accum * self.stage.micro_batch_size

    def batches(self, consumed: int, reader_state: dict) -> Iterator[dict]:
        mb = self.stage.micro_batch_size
        if self.streaming:
            self.dataset.load_state_dict({**reader_state, "items": consumed})  # refuses another data set's position
            loader = DataLoader(self.dataset, batch_size=mb, collate_fn=self.collate,
                                num_workers=self.dataset.num_workers, pin_memory=runtime.device().type == "cuda")
        else:  # workers on a GPU node (none on a CPU): collating 2 packed rows of 327 tokens took 15 ms on
            # a busy CPU core, and a row's attention mask grows with the square of its length
            loader = DataLoader(self.dataset, batch_size=mb, collate_fn=self.collate, sampler=self.order[consumed:],
                                num_workers=runtime.loader_workers(None), pin_memory=runtime.device().type == "cuda")
        return islice(loader, (self.per_rank - consumed) // mb)  # a stream never ends by itself

    def reader_state(self, step: int) -> dict:
        """The shard reader's position after `step` optimizer steps (counted here: with DataLoader
        workers the stream object in this process does not advance)."""
        if not self.streaming:
            return {}
        return {**self.dataset.state_dict(), "items": step * self.stage.grad_accum * self.stage.micro_batch_size}


def stage_data(model: OmniModel, processor: OmniProcessor, dataset, stage: StageConfig,
               generator: torch.Generator) -> StageData:
    """Bind `dataset` (a ShardStream or a list of Encoded samples) to the stage's batching."""
    if stage.packing:
        collate = partial(collate_packed, processor, explicit_mask=not model.varlen,
                          kernel=model.llm.config._attn_implementation)
    else:
        collate = processor.collate
    if isinstance(dataset, ShardStream):
        dataset.configure(processor, batch_size=stage.micro_batch_size, packing=stage.packing, seed=stage.seed)
        return StageData(dataset, collate, stage)
    if stage.packing:  # the items become packed rows (bins of samples); micro_batch_size counts rows
        dataset = pack([dataset[i] for i in range(len(dataset))], model.cfg.max_seq_len)
    data = StageData(dataset, collate, stage)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # The whole index sequence up front, so a resumed run can skip exactly the consumed prefix.
    data.order = list(RandomSampler(dataset, replacement=True, generator=generator,
                                    num_samples=data.per_rank * world))[rank::world]
    return data


def train_stage(model: OmniModel, processor: OmniProcessor, dataset, stage: StageConfig,
                checkpoint_dir: Path | None = None, on_step: Callable[[int, float], None] | None = None,
                progress: bool = True, report_every: int = REPORT_EVERY) -> TrainResult:
    """Train `model` in place for `stage.steps` optimizer steps over `dataset` (sampled with
    replacement, seeded). Returns the loss per step. With `checkpoint_dir`, resumes from its latest
    checkpoint if there is one, and checkpoints into it (raising Preempted after a SIGTERM).
    `on_step(step, loss)` is called for every step, in bursts: the losses stay on the device until
    a report (every `report_every` steps, before a checkpoint and at the end)."""
    init_distributed()
    with reproducible(stage.seed):
        set_trainable(model, stage.trainable)
        adapters = lora.attach(model, stage.lora) if stage.lora else None  # the LLM then learns through them only
        result = TrainResult(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        model.set_activation_checkpointing(stage_checkpointing(model, stage))
        engine = build_engine(model, stage)
        generator = torch.Generator().manual_seed(stage.seed)
        data = stage_data(model, processor, dataset, stage, generator)
        state = checkpointing.resume(engine, checkpoint_dir, generator, stage.steps)
        result.resumed_step = state.step
        batches = data.batches(state.step * stage.grad_accum * stage.micro_batch_size, state.data)
        start = time.perf_counter()
        _loop(engine, batches, data, processor, state, checkpoint_dir, generator, on_step, progress, report_every)
        result.seconds = time.perf_counter() - start
    result.losses, result.tokens, result.data_wait_seconds = state.losses, state.tokens, state.data_wait

    _finish(model, engine, stage)
    if adapters is not None:
        lora.merge(model, adapters)  # downstream sees a plain checkpoint
    return result


@contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Every RNG a stage may draw from seeded (torch, Python's, NumPy's; the sampler and DataLoader
    workers derive theirs from these) and, on the CPU, torch restricted to deterministic kernels, so
    the same inputs on the same machine give the same weights bit for bit. Not on a GPU: kernels
    that add with atomics (embedding and index_add backward, attention backward) sum in a varying
    order, and the deterministic variants cost speed (cuBLAS's also needs CUBLAS_WORKSPACE_CONFIG set
    before CUDA starts). The thread count is an input too (CPU reductions split by thread): torch's
    own choice, OMP_NUM_THREADS or the cores, is the same for two runs on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cpu = runtime.device().type == "cpu"
    previous, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(cpu or previous)
    # Deterministic mode also NaN-fills every torch.empty, which made each DeepSpeed bucket
    # allocation cost tens of ms (a CPU step 3.5x slower); nothing here reads memory it did not write.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _loop(engine, batches: Iterator[dict], data: StageData, processor: OmniProcessor, state: Progress,
          checkpoint_dir: Path | None, generator: torch.Generator, on_step, progress: bool,
          report_every: int = REPORT_EVERY) -> None:
    """Forward, backward and step over `batches`, one optimizer step (grad_accum micro-batches) at a
    time; the losses are reported every `report_every` steps, before each checkpoint and at the end."""
    from tqdm import tqdm

    stage = data.stage
    report = _Report(state, on_step)
    bar = tqdm(total=stage.steps, initial=state.step, desc=f"train {stage.name}", disable=not progress, unit="step")
    engine.train()
    with bar, checkpointing.sigterm_flag(enabled=checkpoint_dir is not None) as sigterm:
        for micro_batches in _optimizer_steps(batches, stage.grad_accum, state):
            micro_batches = [_on_device(b, engine.device) for b in micro_batches]
            report.add(*_step(engine, micro_batches, processor.tok.pad_token_id, stage.packing))
            state.step += 1
            bar.update(1)
            stop = checkpoint_dir is not None and any_rank(sigterm.is_set())
            save = stop or (checkpoint_dir is not None and stage.checkpoint_every
                            and state.step % stage.checkpoint_every == 0)
            if save or state.step % report_every == 0 or state.step == stage.steps:
                bar.set_postfix(loss=f"{report.flush():.3f}")  # the checkpoint carries every loss so far
            if save:
                _checkpoint(engine, checkpoint_dir, data, state, generator, stop)
    report.flush()  # a loader that ended early leaves steps unreported


def _optimizer_steps(batches: Iterator[dict], grad_accum: int, state: Progress) -> Iterator[list[dict]]:
    """`grad_accum` micro-batches at a time; the host's wait for them is added to `state.data_wait`."""
    while True:
        t = time.perf_counter()
        micro_batches = list(islice(batches, grad_accum))
        state.data_wait += time.perf_counter() - t
        if not micro_batches:
            return
        yield micro_batches


def _on_device(batch: dict, device: torch.device) -> dict:
    # From pinned memory (on a GPU) the copies are asynchronous: the step's inputs travel while it runs.
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _step(engine, micro_batches: list[dict], pad_token_id: int, packing: bool) -> tuple[torch.Tensor, ...]:
    """One optimizer step whose gradient is that of the mean loss over every label token of the step,
    on all ranks: each micro-batch's mean loss is weighted by its share of those tokens (a token in
    a short micro-batch or on a rank with few tokens weighs what any other does). DeepSpeed would
    divide by grad_accum (not asked to here) and averages over ranks (undone by the world size).
    Returns this rank's summed token losses, the step's label tokens on all ranks and this rank's
    real tokens, all on the device: nothing here waits for the GPU."""
    counts = [target_tokens(b["labels"]) for b in micro_batches]
    total = sum_over_ranks(torch.stack(counts).sum().to(torch.float64))  # one collective per step
    scale = torch.distributed.get_world_size() / total.clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=total.device)
    real = torch.zeros((), dtype=torch.long, device=total.device)
    for batch, count in zip(micro_batches, counts, strict=True):
        loss = engine(**batch).loss
        engine.backward(loss * (count * scale).to(loss.dtype), scale_wrt_gas=False)
        engine.step()
        loss_sum += loss.detach().double() * count
        real += packed_tokens(batch, pad_token_id) if packing else batch["attention_mask"].sum()
    return loss_sum, total, real


class _Report:
    """Per-step losses and token counts kept on the device until a report: then one collective for
    the global losses and one copy to the host for the whole window, then `on_step` for each step."""

    def __init__(self, state: Progress, on_step: Callable[[int, float], None] | None):
        self.state, self.on_step, self.pending = state, on_step, []

    def add(self, loss_sum: torch.Tensor, total: torch.Tensor, real: torch.Tensor) -> None:
        self.pending.append((loss_sum, total, real))

    def flush(self) -> float:
        """Record the pending steps' losses (mean over every label token of the step, all ranks) and
        real tokens (this rank's); returns the last loss."""
        if not self.pending:
            return self.state.losses[-1] if self.state.losses else float("nan")
        sums, totals, reals = (torch.stack(t) for t in zip(*self.pending, strict=True))
        losses = sum_over_ranks(sums) / totals.clamp(min=1)
        *losses, real = torch.cat([losses, reals.sum().double()[None]]).tolist()
        first = self.state.step - len(self.pending) + 1
        self.state.tokens += int(real)
        self.state.losses.extend(losses)
        self.pending = []
        if self.on_step:
            for step, loss in enumerate(losses, start=first):
                self.on_step(step, loss)
        return losses[-1]


def _checkpoint(engine, checkpoint_dir: Path, data: StageData, state: Progress, generator: torch.Generator,
                stop: bool) -> None:
    """Save the state after `state.step`; after a SIGTERM seen by any rank, stop there."""
    state.data = data.reader_state(state.step)
    checkpointing.save(engine, checkpoint_dir, state, generator)
    if stop:
        checkpointing.log.warning("SIGTERM: saved checkpoint step-%d in %s; stopping (exit code %d), rerun to "
                                  "resume", state.step, checkpoint_dir, PREEMPTED_EXIT_CODE)
        engine.destroy()
        raise Preempted(state.step)


def _finish(model: OmniModel, engine, stage: StageConfig) -> None:
    """Leave full, plain weights in `model` on every rank (ZeRO-3 partitions them) and eval mode."""
    full = gather_full_weights(model) if stage.zero_stage == 3 else None
    engine.destroy()
    if full is not None:
        for name, p in model.named_parameters():
            p.data = full[name]
    model.eval()
