"""Loss-based SFT data filter (Baichuan-Omni, SFT section).

Score every SFT sample with the model as it stands before SFT, fit a Gaussian to the per-sample
losses and drop the samples outside mean +- k * std: far below, the answer is trivially implied by
the prompt; far above, the pair is likely wrong (swapped, hallucinated, mislabeled).

The paper fits one Gaussian over the whole set with k = 1. Where tasks differ a lot in difficulty
(ASR vs multiple choice, and always for a small model), one global fit would drop whole tasks, so
by default each task gets its own fit (`group_by: task`); `group_by: all` is the paper's form.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence, Sized
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch

from model.config import SftFilterConfig
from model.nn.devices import to_consumers
from model.text.processor import Encoded, OmniProcessor


@dataclass
class GroupFit:
    n: int
    mean: float
    std: float
    low: float
    high: float
    dropped_low: int = 0
    dropped_high: int = 0


@dataclass
class FilterResult:
    fits: dict[str, GroupFit]
    dropped: list[dict] = field(default_factory=list)  # {id, task, loss, side}
    kept: int = 0

    def to_json(self) -> dict:
        return {"kept": self.kept, "dropped": self.dropped, "fits": {g: asdict(f) for g, f in self.fits.items()}}

    @property
    def dropped_ids(self) -> set[str]:
        return {d["id"] for d in self.dropped}


@torch.no_grad()
def sample_losses(model: torch.nn.Module, processor: OmniProcessor, samples: Iterable[Encoded],
                  batch_size: int = 8, progress: bool = False, total: int | None = None) -> list[float]:
    """Mean next-token loss over each sample's answer tokens (its labels), one float per sample.
    `samples` may be a lazy iterable: only one batch of encoded media is in memory at a time."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    losses: list[float] = []
    total = total if total is not None else len(samples) if isinstance(samples, Sized) else None
    it = iter(samples)
    with tqdm(total=total, desc="scoring SFT samples", unit="sample", disable=not progress) as bar:
        while batch_samples := list(islice(it, batch_size)):
            batch = to_consumers(model, processor.collate(batch_samples))
            losses += model.sample_losses(**batch).tolist()
            bar.update(len(batch_samples))
    model.train(was_training)
    return losses


def fit(losses: Sequence[float], k: float) -> GroupFit:
    n = len(losses)
    mean = sum(losses) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / n)
    return GroupFit(n=n, mean=mean, std=std, low=mean - k * std, high=mean + k * std)


def loss_filter(ids: Sequence[str], tasks: Sequence[str], losses: Sequence[float],
                cfg: SftFilterConfig) -> FilterResult:
    """Decide per sample; every drop is listed with its loss and side ("low"/"high")."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        groups[task if cfg.group_by == "task" else "all"].append(i)
    result = FilterResult(fits={})
    for name, members in sorted(groups.items()):
        g = fit([losses[i] for i in members], cfg.k_sigma)
        result.fits[name] = g
        if len(members) < cfg.min_group_size:
            result.kept += len(members)
            continue
        for i in members:
            side = "low" if losses[i] < g.low else "high" if losses[i] > g.high else None
            if side is None:
                result.kept += 1
                continue
            setattr(g, f"dropped_{side}", getattr(g, f"dropped_{side}") + 1)
            result.dropped.append({"id": ids[i], "task": tasks[i], "loss": losses[i], "side": side})
    return result
