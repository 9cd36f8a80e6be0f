"""Resumable training state: DeepSpeed checkpoints with the step, the losses so far, the tokens seen,
every RNG state and the reader's position, written every `checkpoint_every` steps and at the step
boundary after a SIGTERM.

The data order is drawn up front from a seeded generator (or is a pure function of the seed for the
shard stream), so a resumed run skips the consumed prefix and continues bit-for-bit (on CPU).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the shell's code for "terminated", so a retry policy re-runs us


class Preempted(SystemExit):
    """Raised after the checkpoint that follows a SIGTERM. Uncaught, it exits the process with
    PREEMPTED_EXIT_CODE and no traceback; the next run with the same checkpoint_dir resumes."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


@dataclass
class Progress:
    """What a checkpoint restores besides the engine: where the stage stood."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    data: dict = field(default_factory=dict)  # the shard reader's state (empty for in-memory data)
    data_wait: float = 0.0  # this process's seconds waiting for batches (not saved: a resumed run measures anew)


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "sampler": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["sampler"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def resume(engine, checkpoint_dir: Path | None, generator: torch.Generator, total_steps: int) -> Progress:
    """The latest checkpoint in `checkpoint_dir` loaded into `engine` (and the RNGs), or a fresh start."""
    if not checkpoint_dir or not (Path(checkpoint_dir) / "latest").is_file():
        return Progress()
    path, client = engine.load_checkpoint(str(checkpoint_dir))
    state = client["train_state"]
    set_rng_state(state["rng"], generator)
    log.info("resumed from %s at step %d/%d", path, state["step"], total_steps)
    return Progress(state["step"], state["losses"], state["tokens"], state.get("data") or {})


def save(engine, checkpoint_dir: Path, progress: Progress, generator: torch.Generator) -> None:
    engine.save_checkpoint(str(checkpoint_dir), tag=f"step-{progress.step}", client_state={"train_state": {
        "step": progress.step, "losses": list(progress.losses), "tokens": progress.tokens,
        "rng": rng_state(generator), "data": progress.data or None}})


@contextmanager
def sigterm_flag(enabled: bool) -> Iterator[threading.Event]:
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
