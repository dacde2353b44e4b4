"""QueCC ("Inference-optimal VLMs need only one visual token"): query-conditioned
convolutional cross-attention (learned), as `quecc` (alias `single-token`).

1. Condition every token on the question: x' = x + LN(Linear(t)), t = the question's
   last-layer LM state from a text-only pass (`ctx.model.question_state`).
2. Queries: a depthwise convolution of x' with kernel = stride = one cell of the grid, so one
   query per cell. Cell sizes vary with the grid and the budget, so the k x k kernel is
   written in a 3 x 3 low-frequency cosine basis over the cell's (row, col) and evaluated at
   whatever size the cell has; one set of weights serves every k. It starts as mean pooling.
3. Each query attends only to its own cell (keys x', values x), then a residual MLP (the
   paper's projector; our tokens are already LM-width, so it maps LM width to LM width).
   The paper uses multi-layer features as keys/values; vidsieve-tiny offers one layer.
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
    budget_is_set,
    cell_mean,
    cell_of_tokens,
    head_count,
    largest_cell_grid,
    module_and_question,
    present_cells,
    tokens_at,
    trainable_input,
)
from compressors.registry import SpecError, register_compressor
from compressors.tokens import VisualTokens

KERNEL_FREQUENCIES = 3  # cosine frequencies 0, 1, 2 along rows and along columns


def kernel_basis(tokens: VisualTokens, cells: CellGrid) -> torch.Tensor:
    """[N, 9]: cos(pi a u) cos(pi b v) at each token's centre (u, v) in (0, 1) inside its cell."""
    _, height, width = tokens.grid_thw
    coords = []
    for axis, (size, count) in enumerate(((height, cells[1]), (width, cells[2]))):
        index = tokens.grid_rc[:, axis]
        cell = index * count // size
        start = (cell * size + count - 1) // count  # first row/col of the cell (even binning)
        stop = ((cell + 1) * size + count - 1) // count
        coords.append((index - start + 0.5) / (stop - start))  # [N] in (0, 1)
    freqs = torch.arange(KERNEL_FREQUENCIES, device=tokens.device) * math.pi
    along_rows = torch.cos(coords[0][:, None] * freqs)  # [N, 3]
    along_cols = torch.cos(coords[1][:, None] * freqs)  # [N, 3]
    return (along_rows[:, :, None] * along_cols[:, None, :]).flatten(1).float()  # [N, 9]


class QueCCModule(nn.Module):
    """The learned part of QueCC for tokens of width `dim` and a question state of `question_dim`."""

    def __init__(self, dim: int, question_dim: int):
        super().__init__()
        self.widths = (dim, question_dim)
        self.condition = nn.Sequential(nn.Linear(question_dim, dim), nn.LayerNorm(dim))
        kernel = torch.zeros(dim, KERNEL_FREQUENCIES**2)
        kernel[:, 0] = 1.0  # the constant basis function alone: mean pooling over the cell
        self.kernel = nn.Parameter(kernel)  # [D, 9] depthwise: one kernel per channel
        self.pool = AttentionPool(dim, head_count(dim))

    def forward(self, tokens: VisualTokens, question: torch.Tensor, cells: CellGrid) -> VisualTokens:
        x = trainable_input(tokens.embeds)  # [N, D]
        conditioned = x + self.condition(question.to(x.dtype))  # [N, D]
        cell, first = present_cells(cell_of_tokens(tokens, cells), len(tokens))  # [N], [C]
        kernel_at_token = kernel_basis(tokens, cells).to(x.dtype) @ self.kernel.T  # [N, D]
        queries = cell_mean(kernel_at_token * conditioned, cell, len(first))  # [C, D]
        return tokens_at(tokens, first, self.pool(queries, conditioned, x, cell))


@register_compressor("quecc", aliases=("single-token",))
@dataclass
class QueCC:
    """QueCC: question-conditioned convolutional cross-attention to a few tokens (learned).

    Sizes. `per_video` gives 1 token for the whole clip (the budget is ignored). Otherwise,
    without a budget in the spec: `per_frame_tokens` per frame (or the largest count <= it
    that a grid of h' x w' cells on the frame's grid gives). With a budget of K =
    budget.resolve(N, F) tokens: the cell grid (t', h', w') with the most cells <= K,
    preferring the most frames kept apart. That is exactly K whenever K factors as
    t' * h' * w' within the grid (always when K <= T; `per_frame=p` with p = h' * w'
    gives p tokens in every frame); otherwise fewer. On already-pruned input, cells left
    empty are skipped. Each token takes its cell's first token's metadata and position.
    Trained by `vidsieve train compressor quecc`; weights load from the model's
    `compressors/quecc.safetensors`.
    """

    stage = "pre_llm"
    trainable = True
    uses_question = True
    question_source = "question_state"  # the model method that turns the question into t
    per_frame_tokens: int = field(
        default=1, metadata={"help": "tokens per frame when the spec gives no budget"}
    )
    per_video: bool = field(default=False, metadata={"help": "one token for the whole clip"})
    module: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.per_frame_tokens < 1:
            raise SpecError(f"quecc per_frame_tokens must be >= 1; got {self.per_frame_tokens}.")

    def new_module(self, dim: int, question_dim: int) -> QueCCModule:
        return QueCCModule(dim, question_dim)

    def cell_grid(
        self, grid_thw: tuple[int, int, int], budget: Budget, num_tokens: int, num_frames: int
    ) -> CellGrid:
        t, h, w = grid_thw
        if self.per_video:
            return (1, 1, 1)
        if not budget_is_set(budget):
            _, cells_h, cells_w = largest_cell_grid((1, h, w), self.per_frame_tokens)
            return (t, cells_h, cells_w)
        return largest_cell_grid(grid_thw, budget.resolve(num_tokens, num_frames))

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        if len(tokens) == 0:
            return tokens
        module, question = module_and_question(self, tokens, ctx)  # question: [Dq]
        cells = self.cell_grid(tokens.grid_thw, ctx.budget, len(tokens), tokens.num_frames)
        return module(tokens, question, cells)
