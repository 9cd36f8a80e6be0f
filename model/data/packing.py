"""Sample packing: several encoded samples per row, up to `max_seq_len`, attention isolated per sample.

A packed row is the samples' tokens laid end to end. Three things keep the samples independent:

- **attention**: a block-diagonal *and* causal (batch, 1, seq, seq) boolean mask (True = may attend).
  Transformers' Qwen2 takes a 4D `attention_mask` as-is (``masking_utils._preprocess_mask_arguments``
  returns early on a 4D tensor) and SDPA applies it, so no sample sees another;
- **positions**: `position_ids` restart at 0 for every sample, so RoPE sees each one as if alone;
- **labels**: the loss shifts labels by one (logit t predicts label t+1), so the last token of
  sample k would be trained to predict the first token of sample k+1. Every sample's first label is
  set to -100; alone, that label is never a target either (nothing precedes it), so the loss of a
  packed sample is exactly its loss alone.

Media tensors are stacked in the order their placeholders appear when the rows are read row-major,
which is the order `OmniModel.embed`'s `masked_scatter` fills them in.

The padding after a row's last sample is a block of its own (causal within itself, so no attention
row is empty: fully masked rows give NaN in some SDPA kernels), with label -100.

GPU alternative (varlen): with `explicit_mask=False` all bins are laid end to end in ONE row with no
attention mask; the sample boundaries are carried by the restarting `position_ids` and by
`cu_seq_lens_q/k` (cumulative lengths, computed here once per batch). The LLM kernels that read
them (`flash_attention_2`, torch's `varlen` and `flex`: model.nn.attention) keep each sample to
itself without any seq x seq mask. A kernel compiled per length (flex) gets the row padded up to a
bucket (`model.nn.attention.pad_to_bucket`): the padding is one more sample, label -100. With SDPA,
transformers builds the block mask from the same position ids (``find_packed_sequence_indices``),
which is how the CPU tests check this layout. The trainer picks this route when the LLM's kernel
takes it (`OmniModel.varlen`).
"""

from __future__ import annotations

import torch

from model.nn.attention import pad_to_bucket
from model.text.processor import IGNORE_INDEX, Encoded, OmniProcessor

MEDIA_KEYS = ("pixel_values", "video_pixel_values", "audio_mel", "audio_frames")


def pack(samples: list[Encoded], max_seq_len: int) -> list[list[Encoded]]:
    """First-fit decreasing: longest sample first, each into the first bin it fits. Deterministic
    (ties keep the input order); every bin holds at most `max_seq_len` tokens."""
    return [[samples[i] for i in b] for b in plan_bins([len(s.input_ids) for s in samples], max_seq_len)]


def plan_bins(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """`pack` on lengths alone: bins of sample indices. The shard reader plans rows from the token
    counts data prep recorded, so it can skip (resume) or hand rows to workers without decoding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_seq_len:
            raise ValueError(f"sample {i} has {n} tokens, more than max_seq_len {max_seq_len}: it cannot be packed")
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([])
            room.append(max_seq_len)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= n
    return bins


def collate_packed(
    processor: OmniProcessor, bins: list[list[Encoded]], explicit_mask: bool = True, kernel: str = ""
) -> dict[str, torch.Tensor]:
    """One row per bin: input_ids, labels, position_ids, a (rows, 1, seq, seq) bool attention mask
    and the media of all samples in order. With `explicit_mask=False` (the varlen route above): one
    row of every bin's samples, no mask, padded only to `kernel`'s bucket (none for most kernels)."""
    if not explicit_mask:
        bins = [[s for row in bins for s in row]]
    width = max(sum(len(s.input_ids) for s in row) for row in bins)
    if not explicit_mask:
        width = pad_to_bucket(width, kernel)
    ids = torch.full((len(bins), width), processor.tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    segment = torch.zeros((len(bins), width), dtype=torch.long)  # which sample each token belongs to
    for r, row in enumerate(bins):
        start = 0
        for k, s in enumerate(row):
            end = start + len(s.input_ids)
            ids[r, start:end] = torch.tensor(s.input_ids)
            labels[r, start:end] = torch.tensor(s.labels)
            labels[r, start] = IGNORE_INDEX  # no target crosses into this sample from the one before
            positions[r, start:end] = torch.arange(end - start)
            segment[r, start:end] = k
            start = end
        positions[r, start:] = torch.arange(width - start)  # the padding: a block of its own
        segment[r, start:] = len(row)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if explicit_mask:
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        batch["attention_mask"] = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    else:
        lengths = [len(s.input_ids) for s in bins[0]]
        padding = width - sum(lengths)
        batch.update(varlen_bounds(lengths + [padding] if padding else lengths))
    # Media: exactly what `collate` stacks for the samples read row by row, sample by sample.
    flat = processor.collate([s for row in bins for s in row])
    batch.update({k: flat[k] for k in MEDIA_KEYS if k in flat})
    return batch


def varlen_bounds(lengths: list[int]) -> dict:
    """Flash-attention's varlen arguments for one unpadded row of samples of these lengths, computed
    here once per batch: transformers otherwise derives them from position_ids in every layer, a
    device-to-host sync each time. Lengths stay Python ints (a tensor max would sync as well)."""
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    longest = max(lengths)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def packed_tokens(batch: dict[str, torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """Real (non-padding) tokens in a packed batch, as a tensor on its device (no host sync)."""
    return (batch["input_ids"] != pad_token_id).sum()
