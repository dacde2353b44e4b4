"""Projector: patch features -> LM input embeddings that know where and when they are.

Three steps, in the order a token meets them:
1. Each patch through a linear layer and a GELU, on its own (the same weights for every patch).
2. Spatial merge: each `merge x merge` block of neighbouring patches is summed into one token
   (a bag of its patches), then a linear layer and a LayerNorm: the content of every visual
   token is at unit RMS, whatever the tower's scale. The LM sees `merge**2` times fewer tokens.
3. Where and when, added to the content: fixed sinusoidal embeddings of the token's row,
   column and frame index, each sinusoid at amplitude 1/4 (RMS 0.18 against the content's 1).
   A token that survives compression carries its place in the clip with it, whatever else
   was dropped, which 1-D RoPE over a pruned sequence cannot tell a small LM.

Why this shape (measured, docs/TRAINING.md, `python -m eval.probe_binding`): an LM learning
from scratch finds the object a question names only while content dominates its tokens.
Visual tokens at an MLP's init scale, or where/when embeddings that are learned (they grow
within a few hundred Adam steps) or fixed at amplitude 1/2, each kept the probe at chance.
The nonlinearity comes before the merge so that a token of several objects says which colour
goes with which shape (a linear layer over the patches first adds "red" from one patch to
"circle" from another). And the merge is a sum, not Qwen2-VL's concatenation: an object that
straddles tokens falls in different sub-patches of each, and concatenated it looks different
in every one; with objects off the merge grid the probe sat at chance with concatenation and
learnt with the sum (93-95% by step 300 for two seeds; when it takes off varies by seed).
"""

from __future__ import annotations

import math

import torch
from torch import nn

WHERE_WHEN_SCALE = 0.25  # amplitude of each sinusoid (RMS 0.18 against the content's 1)


def sinusoid(index: torch.Tensor, dims: int, max_period: float = 4096.0) -> torch.Tensor:
    """index [...] -> [..., dims]; low frequencies are near-linear in index (ordering is easy to read)."""
    half = dims // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=index.device) / half)
    angles = index.float()[..., None] * freqs  # [..., half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Projector(nn.Module):
    def __init__(self, vision_width: int, lm_width: int, *, merge: int = 1, max_grid: int = 64,
                 place_scale: float = WHERE_WHEN_SCALE, time_scale: float = WHERE_WHEN_SCALE):
        """place_scale / time_scale: the amplitude of the row and column sinusoids / of the
        frame's; a model's config records them (VLMConfig.place_scale, .time_scale)."""
        super().__init__()
        self.place_scale, self.time_scale = place_scale, time_scale
        if lm_width % 8:
            raise ValueError(f"the LM width must divide by 8 (row, column and time embeddings); got {lm_width}")
        self.merge = merge
        self.max_grid = max_grid
        self.patch = nn.Sequential(nn.Linear(vision_width, lm_width), nn.GELU())
        self.out = nn.Sequential(nn.Linear(lm_width, lm_width), nn.LayerNorm(lm_width))
        # Biases start at zero (as the LM's own layers): a shared offset would make every visual
        # token point the same way once the LM normalises it.
        with torch.no_grad():
            self.patch[0].bias.zero_()
            self.out[0].bias.zero_()

    def content(self, features: torch.Tensor) -> torch.Tensor:
        """[T, H, W, C] -> [T, H/m, W/m, D]: each patch through the same nonlinearity, then each
        `merge x merge` block summed (H and W must divide by m)."""
        patches = self.patch(features)  # [T, H, W, D]
        t, h, w, d = patches.shape
        m = self.merge
        pooled = patches.view(t, h // m, m, w // m, m, d).sum(dim=(2, 4))  # [T, H/m, W/m, D]
        return self.out(pooled)

    def where_when(self, frame_index: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[T, rows, cols, D]: a quarter of the width each for row and column (at place_scale),
        half for the frame (at time_scale)."""
        d = self.out[0].out_features
        device = frame_index.device
        row = sinusoid(torch.arange(rows, device=device), d // 4, self.max_grid)[None, :, None]
        col = sinusoid(torch.arange(cols, device=device), d // 4, self.max_grid)[None, None, :]
        time = sinusoid(frame_index, d // 2)[:, None, None]
        t = len(frame_index)
        parts = [row.expand(t, rows, cols, -1) * self.place_scale, col.expand(t, rows, cols, -1) * self.place_scale,
                 time.expand(t, rows, cols, -1) * self.time_scale]
        return torch.cat(parts, dim=-1)

    def forward(self, features: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        """features [T, H, W, C] patch tokens -> [T, H/m, W/m, D_lm].

        frame_index [T]: each frame's index in the clip (default 0..T-1); a stream passes the
        index of the frame in the whole stream.
        """
        tokens = self.content(features)  # [T, Hm, Wm, D], unit RMS
        t, hm, wm, _ = tokens.shape
        if frame_index is None:
            frame_index = torch.arange(t, device=tokens.device)
        return tokens + self.where_when(frame_index.to(tokens.device), hm, wm).to(tokens.dtype)
