"""The baselines every results table includes: none, avgpool, uniform and random.

All four are training-free pre-LLM compressors and pure functions of (tokens, ctx). They work
on already-compressed input too: they read frames and grid cells from the token metadata,
never from the position of a token in the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from compressors.context import CompressionContext
from compressors.registry import SpecError, register_compressor
from compressors.tokens import VisualTokens


@register_compressor("none")
@dataclass
class NoCompression:
    """Every visual token, unchanged (the budget is ignored)."""

    stage = "pre_llm"
    trainable = False
    uses_question = False

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        return tokens


@register_compressor("avgpool")
@dataclass
class AvgPool:
    """Spatial average pooling of each frame's patch grid by factor x factor windows.

    Windows are cut from the uncompressed grid (ceil mode): a window at a ragged edge is
    averaged over the tokens it holds, as is a window some of whose tokens were already
    dropped. Each pooled token keeps the metadata and positions of its window's first token
    present (top-left on a full grid). The size is set by `factor`; the budget is ignored.
    """

    stage = "pre_llm"
    trainable = False
    uses_question = False
    factor: int = field(default=2, metadata={"help": "side of the square pooling window, >= 1"})

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise SpecError(f"avgpool factor must be >= 1; got {self.factor}.")

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        if self.factor == 1 or len(tokens) == 0:
            return tokens
        _, height, width = tokens.grid_thw
        windows_per_row = math.ceil(width / self.factor)
        windows_per_frame = math.ceil(height / self.factor) * windows_per_row
        window_rc = tokens.grid_rc // self.factor  # [N, 2]
        window = (
            tokens.frame_index * windows_per_frame
            + window_rc[:, 0] * windows_per_row
            + window_rc[:, 1]
        )  # [N], a global window id
        groups = torch.unique(window, return_inverse=True)[1]  # [N] in [0, G), none empty
        return tokens.merge(groups, torch.ones(len(tokens), device=tokens.device))


@register_compressor("uniform")
@dataclass
class UniformFrames:
    """All tokens of uniformly spaced frames, none of the others.

    With `every` = k > 0, keeps the 1st, (k+1)-th, (2k+1)-th ... frame present (frames
    0, k, 2k, ... of a full clip) and ignores the budget. With `every` = 0, the budget decides: it keeps
    ceil(F * kept_fraction) of the F frames present, spread evenly from first to last
    (rounded linspace), where kept_fraction = budget.resolve(N, F) / N. The number of tokens
    kept therefore meets the budget only when frames hold equally many tokens.
    """

    stage = "pre_llm"
    trainable = False
    uses_question = False
    every: int = field(
        default=0, metadata={"help": "keep every k-th frame; 0 = derive from the budget"}
    )

    def __post_init__(self) -> None:
        if self.every < 0:
            raise SpecError(f"uniform every must be >= 0; got {self.every}.")

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        frames = torch.unique(tokens.frame_index)  # [F] sorted frames present
        num_frames = frames.numel()
        if num_frames == 0:
            return tokens
        if self.every > 0:
            kept_frames = frames[:: self.every]
        else:
            kept_fraction = ctx.budget.resolve(len(tokens), num_frames) / len(tokens)
            num_kept = max(1, math.ceil(num_frames * kept_fraction))
            picks = torch.linspace(0, num_frames - 1, num_kept, dtype=torch.float64).round()
            kept_frames = frames[picks.long().to(frames.device)]
        return tokens.select(torch.isin(tokens.frame_index, kept_frames))


@register_compressor("random")
@dataclass
class RandomTokens:
    """Exactly budget.resolve(N, F) tokens drawn uniformly at random without replacement.

    The draw uses a CPU generator seeded with ctx.seed, so the same seed keeps the same
    tokens on every device. A strong baseline per UniPruneBench.
    """

    stage = "pre_llm"
    trainable = False
    uses_question = False

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        keep = ctx.budget.resolve(len(tokens), tokens.num_frames)
        if keep >= len(tokens):
            return tokens
        chosen = torch.randperm(len(tokens), generator=ctx.generator("cpu"))[:keep]  # [keep]
        return tokens.select(chosen.to(tokens.device))
