"""FastV (baseline): after layer K-1, keep the visual tokens the last token attends to most.

Only layer K-1's attention probabilities are computed explicitly (for the question's tokens);
every other layer keeps the fused attention kernel. From layer K on, the dropped visual
tokens are gone: later layers compute nothing for them and decoding never sees them (unlike
the reference code, they also leave the first K layers' cache, which saves memory and changes
nothing in prefill). Survivors keep their original position ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressors.budget import Budget
from compressors.context import CompressionContext
from compressors.protocol import LayerObservation
from compressors.registry import SpecError, register_compressor
from compressors.tokens import VisualTokens

DEFAULT_KEEP_RATIO = 0.5  # FastV's R = 50% when the spec sets no budget


@register_compressor("fastv")
@dataclass
class FastV:
    """FastV: rank visual tokens by the last token's attention at layer K-1; keep the top ones."""

    stage = "in_llm"
    trainable = False
    uses_question = True
    layer: int = field(default=2, metadata={"help": "K: prune before this layer (scores from layer K-1), >= 1"})

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise SpecError(f"fastv: layer must be >= 1, got {self.layer}")

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        """Nothing happens before the LM; see `hook`."""
        return tokens

    def hook(self, ctx: CompressionContext, num_layers: int) -> "FastVHook":
        if self.layer >= num_layers:
            raise SpecError(f"fastv: layer={self.layer} but the model has only {num_layers} layers")
        return FastVHook(layers=(self.layer - 1,), budget=ctx.budget)


@dataclass
class FastVHook:
    layers: tuple[int, ...]
    budget: Budget
    wants: str = "attention"

    def select(self, observation: LayerObservation) -> torch.Tensor:
        visual = observation.is_visual
        num_visual = int(visual.sum())
        frames = int(observation.frame_index[visual].unique().numel())
        keep_count = (self.budget.resolve(num_visual, frames) if self.budget != Budget()
                      else max(1, round(DEFAULT_KEEP_RATIO * num_visual)))
        scores = observation.text_attention[-1]  # [L] the last token's attention
        visual_at = visual.nonzero()[:, 0]
        best = torch.topk(scores[visual_at], keep_count, sorted=False).indices
        keep = ~visual.clone()
        keep[visual_at[best]] = True
        return keep
