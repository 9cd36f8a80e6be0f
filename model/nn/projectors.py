"""Projectors from encoder space into the LLM's embedding space.

    image  -> SigLIP patches -> VisionProjector: 2x2 merge of neighbouring patches (odd grids folded), MLP
    video  -> SigLIP patches per frame -> the image merge, one more 2x2 merge (VideoProjector), the image MLP
    audio  -> Whisper frames -> ConvGMLPProjector: gated Conv1d downsampling n-fold, linear shortcut, LayerNorm
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _square(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, N, C) patch tokens -> (B, C, g, g) grid."""
    b, n, c = x.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"expected a square patch grid, got {n} tokens")
    return x.transpose(1, 2).reshape(b, c, g, g), g


def merge_2x2_padded(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(B, g*g, C) -> (B, ceil(g/2)^2, C') through a 2x2 stride-2 conv; an odd grid is zero-padded by
    one row and column first. The output is again a square grid (the video path merges it twice)."""
    grid, g = _square(x)
    if g % 2:
        grid = F.pad(grid, (0, 1, 0, 1))
    return conv(grid).flatten(2).transpose(1, 2)


def merge_2x2(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(B, g*g, C) -> (B, floor(g^2/4), C'): every output token merges 4 neighbouring patches.

    Even grids are tiled by 2x2 squares. An odd grid g = 2k+1 (27x27 for SigLIP-384/14) is handled
    without padding tokens or dropping patches: the (g-1)^2 interior is tiled by 2x2 squares (k^2
    tokens), and the L-shaped border (last column top to bottom, then last row right to left, a path
    of 2g-1 = 4k+1 adjacent patches) is cut into k runs of 4, each run laid out as a 2x2 window for
    the same conv; the path's final patch is averaged into its neighbour at the end of the last run.
    That is k^2 + k tokens: 729 patches -> 182, the paper's count."""
    grid, g = _square(x)
    if g % 2 == 0:
        return conv(grid).flatten(2).transpose(1, 2)
    b, c, k = grid.shape[0], grid.shape[1], g // 2
    inner = conv(grid[:, :, : g - 1, : g - 1]).flatten(2).transpose(1, 2)  # (B, k^2, C')
    path = torch.cat([grid[:, :, :, g - 1], grid[:, :, g - 1, : g - 1].flip(-1)], dim=2)  # (B, C, 4k+1)
    runs = path[:, :, : 4 * k].clone()
    runs[:, :, -1] = (path[:, :, -2] + path[:, :, -1]) / 2
    windows = runs.reshape(b, c, k, 2, 2).permute(0, 2, 1, 3, 4).reshape(b * k, c, 2, 2)
    border = conv(windows).reshape(b, k, -1)
    return torch.cat([inner, border], dim=1)


class VisionProjector(nn.Module):
    """2x2 stride-2 merge of neighbouring patches, then a 2-layer MLP into the LLM width."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.merge = nn.Conv2d(vision_dim, vision_dim, kernel_size=2, stride=2)
        self.mlp = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(merge_2x2(patches, self.merge))


class VideoProjector(nn.Module):
    """The image projector plus one more 2x2 merge: 4x fewer tokens per frame than an image.
    Shares the image projector's weights; only `extra_merge` is its own (the paper's video stage
    trains this module alone)."""

    def __init__(self, vision_dim: int):
        super().__init__()
        self.extra_merge = nn.Conv2d(vision_dim, vision_dim, kernel_size=2, stride=2)

    def forward(self, patches: torch.Tensor, image_projector: VisionProjector) -> torch.Tensor:
        # Padded, not folded: the first merge must leave a square grid for the second.
        once = merge_2x2_padded(patches, image_projector.merge)
        return image_projector.mlp(merge_2x2_padded(once, self.extra_merge))


class ConvGMLPProjector(nn.Module):
    """Conv-GMLP audio projector (Baichuan-Omni): two parallel Conv1d with kernel = stride = n widen
    the channels n-fold; one passes through SiLU and gates the other; a linear layer projects down;
    a linear shortcut of the reshaped input (n frames stacked) is added; LayerNorm on the sum.
    Downsamples the 50 Hz encoder output n-fold (n=4: 12.5 tokens per second)."""

    def __init__(self, audio_dim: int, llm_dim: int, stride: int):
        super().__init__()
        self.stride = stride
        wide = audio_dim * stride
        self.gate = nn.Conv1d(audio_dim, wide, kernel_size=stride, stride=stride)
        self.value = nn.Conv1d(audio_dim, wide, kernel_size=stride, stride=stride)
        self.down = nn.Linear(wide, llm_dim)
        self.shortcut = nn.Linear(wide, llm_dim)
        self.norm = nn.LayerNorm(llm_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, c = frames.shape
        t = t - t % self.stride  # trailing frames that do not fill a window carry no full token
        frames = frames[:, :t]
        x = frames.transpose(1, 2)
        gated = F.silu(self.gate(x)) * self.value(x)
        stacked = frames.reshape(b, t // self.stride, c * self.stride)
        return self.norm(self.down(gated.transpose(1, 2)) + self.shortcut(stacked))
