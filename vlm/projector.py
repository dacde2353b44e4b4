"""Projector: vision features [.., D_vision] -> LM input embeddings [.., D_lm] (LLaVA's 2-layer MLP)."""

from __future__ import annotations

from torch import nn


class Projector(nn.Sequential):
    def __init__(self, vision_width: int, lm_width: int):
        super().__init__(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
