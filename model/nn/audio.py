"""The audio tower: Whisper's encoder on inputs of any length."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from model.nn import attention


class AudioEncoder(nn.Module):
    """Whisper encoder that accepts any number of mel frames (<= 2 * max_source_positions).

    The stock forward insists on exactly 30 s of (padded) input; here the positional table is
    sliced to the input length, so a 2 s clip costs 2 s of compute. Padding inside a batch is masked,
    or, with a packed-row kernel (model.nn.attention), not computed at all: the windows' valid
    positions run as one row bounded per window.
    """

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.encoder = WhisperEncoder(cfg)

    def forward(self, mel: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.encoder
        x = F.gelu(enc.conv1(mel.to(enc.conv1.weight.dtype)))  # features come in fp32; weights may be bf16
        if frames is not None:
            # Zero what conv1 made of the padding, so conv2 sees at the edge what an unpadded clip sees.
            x = x * (torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None])[:, None, :]
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        t = x.shape[1]
        if t > enc.embed_positions.num_embeddings:
            raise ValueError(f"audio window of {t} frames exceeds the encoder's {enc.embed_positions.num_embeddings}")
        x = x + enc.embed_positions.weight[:t]
        if frames is not None and enc.config._attn_implementation in attention.KERNELS:
            return enc.layer_norm(self._unpadded_layers(x, (frames + 1) // 2))
        mask = None
        if frames is not None:  # frames: valid mel frames per item -> valid encoder positions
            valid = torch.arange(t, device=x.device)[None, :] < ((frames + 1) // 2)[:, None]
            mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in enc.layers:
            x = layer(x, mask)
            x = x[0] if isinstance(x, tuple) else x
        return enc.layer_norm(x)

    def _unpadded_layers(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The layers over the windows' valid positions laid end to end (one row, bounded per window),
        scattered back to (windows, positions, dim) with zeros where a window is padding."""
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        row = x[valid][None]
        bounds = attention.unpadded_bounds(lengths)
        for layer in self.encoder.layers:
            row = layer(row, None, **bounds)
            row = row[0] if isinstance(row, tuple) else row
        return torch.zeros_like(x).masked_scatter(valid[..., None], row[0])
