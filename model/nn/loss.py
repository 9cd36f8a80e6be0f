"""The causal-LM loss without the full logits: the LM head and cross-entropy run over chunks of the
target positions, each chunk recomputed in backward instead of kept.

At paper scale (vocabulary 152,064, micro-batch 8 x 4096 tokens) the plain loss holds bf16 logits,
their fp32 upcast, the saved log-softmax and its gradient: ~14 bytes per logit, ~70 GB, more than an
80 GB GPU has left. Chunked, the head costs about `chunk_tokens x vocab x 18` bytes at its peak
(~2.6 GB at 1024 tokens) and nothing is kept between forward and backward but the hidden states.
The numbers equal transformers' plain loss (shifted labels, -100 ignored, mean over target tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of `labels` (B, T) the causal-LM loss averages over (shifted, -100 ignored),
    as a tensor on their device (no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # The head is called as a module so ZeRO-3's hooks gather its weight (in forward and in recompute).
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                           chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels` (B, T), -100 ignored.
    Logit t predicts label t+1, as in `transformers`' causal-LM loss."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_chunk_loss, head, states[start:stop], targets[start:stop], use_reentrant=False)
    return total / targets.numel() if targets.numel() else total + 0.0 * hidden.sum()


@torch.no_grad()
def per_sample_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                    chunk_tokens: int) -> torch.Tensor:
    """(B,) mean next-token loss of each sample over its target tokens (0 for a sample without any),
    the logits computed `chunk_tokens` rows at a time (all at once when 0). For scoring, not training."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    states, targets = hidden[:, :-1][keep], targets[keep]
    sums = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    step = chunk_tokens or max(1, targets.numel())
    for start in range(0, targets.numel(), step):
        part = F.cross_entropy(head(states[start:start + step]).float(), targets[start:start + step], reduction="none")
        sums.index_add_(0, rows[start:start + step], part)
    return sums / keep.sum(1).clamp(min=1)
