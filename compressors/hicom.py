"""HICom: instruction-conditioned hybrid compression (learned), as `hicom`.

Two branches read the clip's tokens (keys; for vidsieve-tiny the projected tokens, which are
also the values: the model has no separate penultimate features) guided by the question g:

- Local: the token grid is cut into cells of about `group_t x group_h x group_w` tokens
  (see `compressors.learned`); a cell's query is the mean of its tokens (area downsampling,
  which is trilinear downsampling for factor 2 and its anti-aliased form otherwise), g is
  injected by FiLM, LN(q * (1 + scale(g)) + shift(g)), and the query attends only to its
  own cell's tokens; then a residual MLP.
- Global: `num_global` learned queries, distinct from each other and FiLM-modulated by g
  (the public release replaces them all by g, which makes them identical), cross-attend
  over every token, keys carrying a 3-D sin-cos embedding of (frame, row, col).

Output: the local tokens, a learned newline token, then the global tokens. g is
`ctx.model.embed_text(question)`: the open_clip text tower when the model has one; for
vidsieve-tiny (no text tower) the mean of the LM's input embeddings of the question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from compressors.budget import Budget
from compressors.context import CompressionContext
from compressors.learned import (
    AttentionPool,
    CellGrid,
    FiLM,
    budget_is_set,
    cell_count,
    cell_mean,
    cell_of_tokens,
    head_count,
    largest_cell_grid,
    module_and_question,
    present_cells,
    sincos_3d,
    tokens_at,
    trainable_input,
)
from compressors.registry import SpecError, register_compressor
from compressors.tokens import VisualTokens

POSITION_DIMS_PER_AXIS = 32


class HiComModule(nn.Module):
    """The learned part of HICom for tokens of width `dim` and a guide of width `guide_dim`."""

    def __init__(self, dim: int, guide_dim: int, num_global: int):
        super().__init__()
        self.widths = (dim, guide_dim)
        self.local_film = FiLM(dim, guide_dim)
        self.local_pool = AttentionPool(dim, head_count(dim))
        self.global_queries = nn.Parameter(torch.randn(num_global, dim))  # [G, D], distinct
        self.global_film = FiLM(dim, guide_dim)
        self.position_keys = nn.Linear(3 * POSITION_DIMS_PER_AXIS, dim)
        self.global_pool = AttentionPool(dim, head_count(dim))
        self.newline = nn.Parameter(0.02 * torch.randn(dim))

    def forward(
        self, tokens: VisualTokens, guide: torch.Tensor, cells: CellGrid, num_global: int
    ) -> VisualTokens:
        """Local tokens of `cells`, then (when num_global > 0) newline + the first
        `num_global` global tokens, which take the metadata of the clip's last token."""
        x = trainable_input(tokens.embeds)  # [N, D]
        guide = guide.to(x.dtype)
        cell, first = present_cells(cell_of_tokens(tokens, cells), len(tokens))  # [N], [C]
        local_queries = self.local_film(cell_mean(x, cell, len(first)), guide)  # [C, D]
        local = self.local_pool(local_queries, x, x, cell)  # [C, D]
        if num_global == 0:
            return tokens_at(tokens, first, local)
        global_queries = self.global_film(self.global_queries[:num_global], guide)  # [G, D]
        positions = sincos_3d(tokens, POSITION_DIMS_PER_AXIS).to(x.dtype)  # [N, 96]
        global_tokens = self.global_pool(global_queries, x + self.position_keys(positions), x)
        embeds = torch.cat([local, self.newline[None], global_tokens])  # [C + 1 + G, D]
        last = torch.full((num_global + 1,), len(tokens) - 1, device=first.device)
        return tokens_at(tokens, torch.cat([first, last]), embeds)


@register_compressor("hicom")
@dataclass
class HiCom:
    """HICom: question-guided local cells + newline + global queries (learned, FiLM-conditioned).

    Sizes. Without a budget in the spec: ceil(T/group_t) * ceil(H/group_h) * ceil(W/group_w)
    local tokens (cells hold at most that many tokens per axis, split evenly: a 4-row grid
    with group_h=3 gets 2 cells of 2 rows), plus a newline and `num_global` global tokens.
    With a budget of K = budget.resolve(N, F) tokens: K <= 2 gives K local tokens only;
    otherwise the output is L local + newline + G global = K exactly, with G the count in
    1..num_global nearest to min(num_global, (K-1)//2) for which some cell grid has exactly
    L = K-1-G cells (the grid closest in proportion to the group sizes). When no G fits
    (only for grids much coarser than num_global allows), fewer than K tokens come out.
    On already-pruned input, cells left empty are skipped (fewer tokens).

    Metadata: a local token takes its cell's first token's frame, grid cell, timestamp and
    position; the newline and global tokens take the clip's last token's (so positions never
    leave the span and stay in order). Trained by `vidsieve train compressor hicom`; weights
    load from the model's `compressors/hicom.safetensors`.
    """

    stage = "pre_llm"
    trainable = True
    uses_question = True
    question_source = "embed_text"  # the model method that turns the question into g
    group_t: int = field(default=4, metadata={"help": "frames per local cell (at most)"})
    group_h: int = field(default=3, metadata={"help": "token rows per local cell (at most)"})
    group_w: int = field(default=3, metadata={"help": "token columns per local cell (at most)"})
    num_global: int = field(default=32, metadata={"help": "learned global queries (the most used)"})
    module: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("group_t", "group_h", "group_w"):
            if getattr(self, key) < 1:
                raise SpecError(f"hicom {key} must be >= 1; got {getattr(self, key)}.")
        if self.num_global < 0:
            raise SpecError(f"hicom num_global must be >= 0; got {self.num_global}.")

    def new_module(self, dim: int, guide_dim: int) -> HiComModule:
        return HiComModule(dim, guide_dim, self.num_global)

    def output_shape(
        self, grid_thw: tuple[int, int, int], budget: Budget, num_tokens: int, num_frames: int
    ) -> tuple[CellGrid, int]:
        """(local cell grid, number of global tokens) for this clip and budget."""
        t, h, w = grid_thw
        preferred = (t / self.group_t, h / self.group_h, w / self.group_w)
        if not budget_is_set(budget):
            cells = (math.ceil(t / self.group_t), math.ceil(h / self.group_h),
                     math.ceil(w / self.group_w))
            return cells, self.num_global
        keep = budget.resolve(num_tokens, num_frames)
        if keep <= 2 or self.num_global == 0:
            return largest_cell_grid(grid_thw, keep, preferred=preferred), 0
        base = min(self.num_global, (keep - 1) // 2)
        candidates = sorted(range(1, min(self.num_global, keep - 2) + 1),
                            key=lambda g: (abs(g - base), g))
        for num_global in candidates:
            local = keep - 1 - num_global
            cells = largest_cell_grid(grid_thw, local, preferred=preferred)
            if cell_count(cells) == local:
                return cells, num_global
        return largest_cell_grid(grid_thw, keep - 1 - base, preferred=preferred), base

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        if len(tokens) == 0:
            return tokens
        module, guide = module_and_question(self, tokens, ctx)  # guide: [G]
        cells, num_global = self.output_shape(
            tokens.grid_thw, ctx.budget, len(tokens), tokens.num_frames
        )
        return module(tokens, guide, cells, num_global)
