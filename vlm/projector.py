"""Projector: patch features -> LM input embeddings that know where and when they are.

Three steps, in the order a token meets them:
1. Spatial merge (as Qwen2-VL's patch merger): each `merge x merge` block of neighbouring
   patches is concatenated into one token, so the LM sees `merge**2` times fewer tokens
   without losing any feature.
2. A 2-layer MLP (LLaVA's projector) to the LM width.
3. Where and when, added to the content: learned row and column embeddings and a sinusoidal
   embedding of the frame index. A token that survives compression carries its place in the
   clip with it, whatever else was dropped, which 1-D RoPE over a pruned sequence cannot
   tell a small LM.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoid(index: torch.Tensor, dims: int, max_period: float = 4096.0) -> torch.Tensor:
    """index [...] -> [..., dims]; low frequencies are near-linear in index (ordering is easy to read)."""
    half = dims // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=index.device) / half)
    angles = index.float()[..., None] * freqs  # [..., half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Projector(nn.Module):
    def __init__(self, vision_width: int, lm_width: int, *, merge: int = 1, max_grid: int = 64, time_dims: int = 32):
        super().__init__()
        self.merge = merge
        self.time_dims = time_dims
        self.mlp = nn.Sequential(nn.Linear(vision_width * merge * merge, lm_width), nn.GELU(),
                                 nn.Linear(lm_width, lm_width))
        self.row = nn.Embedding(max_grid, lm_width)
        self.col = nn.Embedding(max_grid, lm_width)
        self.time = nn.Linear(time_dims, lm_width)
        # Where/when start small beside the content (std 0.02, as ViT position embeddings): with
        # nn.Embedding's N(0, 1) they were ~7x the content's norm, the content differences
        # between tokens ~5% of each vector, and a small LM learnt to read positions long
        # before it read colours (measured in docs/TRAINING.md).
        with torch.no_grad():
            self.row.weight.mul_(0.02)
            self.col.weight.mul_(0.02)
            self.time.weight.mul_(0.1)

    def merge_patches(self, features: torch.Tensor) -> torch.Tensor:
        """[T, H, W, C] -> [T, H/m, W/m, C*m*m] (H and W must divide by m)."""
        t, h, w, c = features.shape
        m = self.merge
        blocks = features.view(t, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(t, h // m, w // m, m * m * c)

    def forward(self, features: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        """features [T, H, W, C] patch tokens -> [T, H/m, W/m, D_lm].

        frame_index [T]: each frame's index in the clip (default 0..T-1); a stream passes the
        index of the frame in the whole stream.
        """
        tokens = self.mlp(self.merge_patches(features))  # [T, Hm, Wm, D]
        t, hm, wm, _ = tokens.shape
        if frame_index is None:
            frame_index = torch.arange(t, device=tokens.device)
        rows = self.row(torch.arange(hm, device=tokens.device))[None, :, None]  # [1, Hm, 1, D]
        cols = self.col(torch.arange(wm, device=tokens.device))[None, None, :]  # [1, 1, Wm, D]
        times = self.time(sinusoid(frame_index.to(tokens.device), self.time_dims).to(tokens.dtype))
        return tokens + rows + cols + times[:, None, None, :]
