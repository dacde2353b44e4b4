"""What the learned compressors (hicom, quecc) share: cell grids, guided pooling, their weights.

Both summarise a clip's token grid cell by cell: the uncompressed grid (T, H, W) is cut into
a coarser grid of cells (t', h', w') by even binning (cell of frame t = floor(t * t' / T),
likewise rows and columns), so cells differ in size by at most one token along each axis and
no cell is empty on a full grid. A cell's output token takes the metadata and ORIGINAL position
of the cell's first token, so positions stay inside the span and in order.

Weights: a compressor's `nn.Module` is built on its first `compress` (widths from the
tokens and the question vector), initialised from `ctx.seed` of that call without touching
the global RNG, then replaced by trained weights when the model ships them
(`ctx.model.compressor_state(name)`). Outputs are differentiable in the module's parameters;
the question vector is computed without gradients (the model stays frozen).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from compressors.budget import Budget
from compressors.context import CompressionContext, ContextError
from compressors.tokens import VisualTokens
from kernels.errors import VidsieveError

CellGrid = tuple[int, int, int]  # (t', h', w') cells along time, rows, columns


class CompressorWeightsError(VidsieveError):
    """Trained compressor weights that do not fit the compressor as configured."""


# --- budgets and cell grids -------------------------------------------------------------


def budget_is_set(budget: Budget) -> bool:
    """Whether the spec gave a ratio, tokens or per_frame (else the method picks its own size)."""
    return budget != Budget()


def largest_cell_grid(
    grid_thw: tuple[int, int, int],
    target: int,
    *,
    preferred: tuple[float, float, float] | None = None,
) -> CellGrid:
    """The cell grid with the most cells not above `target` (at least one cell).

    Among grids with as many cells, `preferred` None keeps the most frames apart (largest t',
    then the squarest h' x w'); a `preferred` shape picks the grid closest to it in proportion
    (least variance of log(cells / preferred) over the three axes). Remaining ties: larger
    t', then h', then w'.
    """
    t, h, w = grid_thw
    target = max(1, target)
    best_key, best = None, (1, 1, 1)
    for cells_t in range(1, t + 1):
        for cells_h in range(1, h + 1):
            cells_w = min(w, target // (cells_t * cells_h))
            if cells_w < 1:
                break
            cells = (cells_t, cells_h, cells_w)
            if preferred is None:
                shape = (-cells_t, abs(math.log(cells_h / cells_w)))
            else:
                logs = [math.log(c / p) for c, p in zip(cells, preferred)]
                mean = sum(logs) / 3
                shape = (sum((x - mean) ** 2 for x in logs),)
            key = (-cells_t * cells_h * cells_w, *shape, -cells_t, -cells_h, -cells_w)
            if best_key is None or key < best_key:
                best_key, best = key, cells
    return best


def cell_count(cells: CellGrid) -> int:
    return cells[0] * cells[1] * cells[2]


def cell_of_tokens(tokens: VisualTokens, cells: CellGrid) -> torch.Tensor:
    """[N] int64: the cell (row-major over (t', h', w')) of each token, by even binning."""
    t, h, w = tokens.grid_thw
    cell_t = tokens.frame_index * cells[0] // t
    cell_h = tokens.grid_rc[:, 0] * cells[1] // h
    cell_w = tokens.grid_rc[:, 1] * cells[2] // w
    return (cell_t * cells[1] + cell_h) * cells[2] + cell_w


def present_cells(cell: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense cell id [N] in [0, C) for the C cells that hold a token, first token [C] of each).

    Dense ids are numbered in order of each cell's first token, so outputs built cell by cell
    keep the tokens' original order.
    """
    ids, dense = torch.unique(cell, return_inverse=True)  # ids [C] sorted, dense [N]
    index = torch.arange(num_tokens, device=cell.device)
    first = torch.full((ids.numel(),), num_tokens, dtype=torch.long, device=cell.device)
    first = first.scatter_reduce(0, dense, index, reduce="amin")  # [C]
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=cell.device)
    return rank[dense], first[order]


def tokens_at(tokens: VisualTokens, source: torch.Tensor, embeds: torch.Tensor) -> VisualTokens:
    """New tokens `embeds` [M, D'], token i with the metadata and position of input token
    `source[i]` (repeats allowed)."""
    return VisualTokens(
        embeds=embeds,
        frame_index=tokens.frame_index[source],
        grid_rc=tokens.grid_rc[source],
        timestamp_s=tokens.timestamp_s[source],
        positions=tokens.positions[source],
        grid_thw=tokens.grid_thw,
        span_length=tokens.span_length,
    )


def cell_mean(values: torch.Tensor, cell: torch.Tensor, num_cells: int) -> torch.Tensor:
    """values [N, D] averaged per cell -> [C, D] (area downsampling of the token grid)."""
    summed = values.new_zeros(num_cells, values.shape[1]).index_add(0, cell, values)
    counts = torch.bincount(cell, minlength=num_cells).clamp(min=1).to(values.dtype)
    return summed / counts[:, None]


def sincos_3d(tokens: VisualTokens, dims_per_axis: int = 32) -> torch.Tensor:
    """[N, 3 * dims_per_axis] fixed sin-cos embedding of each token's (frame, row, col)."""
    half = dims_per_axis // 2
    freqs = torch.exp(-math.log(100.0) * torch.arange(half, device=tokens.device) / half)  # [half]
    coords = torch.cat([tokens.frame_index[:, None], tokens.grid_rc], dim=1).float()  # [N, 3]
    angles = coords[:, :, None] * freqs  # [N, 3, half]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


def trainable_input(embeds: torch.Tensor) -> torch.Tensor:
    """Tokens made by `encode_frames` are inference tensors, which autograd refuses to save."""
    return embeds.clone() if embeds.is_inference() and torch.is_grad_enabled() else embeds


def question_vector(ctx: CompressionContext, method: str, what: str) -> torch.Tensor:
    """`ctx.model.<what>(ctx.question)` as a flat vector, computed without gradients."""
    compute = getattr(ctx.model, what, None)
    if compute is None:
        raise ContextError(
            f"{method} conditions on the question through the model's {what}(text), but the "
            "compression context has no model handle offering it; pass model=... to "
            "CompressionContext."
        )
    with torch.no_grad():
        return compute(ctx.question).detach().reshape(-1)


# --- modules -----------------------------------------------------------------------------


class FiLM(nn.Module):
    """Feature-wise modulation by a guide vector: LN(q * (1 + scale(g)) + shift(g))."""

    def __init__(self, dim: int, guide_dim: int):
        super().__init__()
        self.scale = nn.Linear(guide_dim, dim)
        self.shift = nn.Linear(guide_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """queries [Q, D], guide [G] -> [Q, D]."""
        return self.norm(queries * (1 + self.scale(guide)) + self.shift(guide))


class AttentionPool(nn.Module):
    """Multi-head attention pooling of tokens into queries, then a residual MLP.

    Values are the tokens themselves (each head pools its 1/heads slice of the width), so an
    output starts as a convex mix of tokens the frozen LM already reads; the MLP's last layer
    starts near zero and learns a correction. With `cell` given, query c sees only the keys
    of cell c (a grouped softmax, O(N·D)); without, every query sees every key.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        nn.init.normal_(self.mlp[-1].weight, std=1e-3)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cell: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries [Q, D], keys [N, D], values [N, D], cell [N] in [0, Q) or None -> [Q, D]."""
        num_queries, dim = queries.shape
        head_dim = dim // self.heads
        q = self.to_q(queries).view(num_queries, self.heads, head_dim)  # [Q, h, d]
        k = self.to_k(keys).view(-1, self.heads, head_dim)  # [N, h, d]
        v = values.view(-1, self.heads, head_dim)  # [N, h, d]
        if cell is None:
            scores = torch.einsum("qhd,nhd->hqn", q, k) / math.sqrt(head_dim)  # [h, Q, N]
            pooled = torch.einsum("hqn,nhd->qhd", scores.softmax(dim=-1), v)
        else:
            scores = (q[cell] * k).sum(-1) / math.sqrt(head_dim)  # [N, h], vs its cell's query
            cell_max = scores.new_full((num_queries, self.heads), -torch.inf)
            cell_max = cell_max.scatter_reduce(
                0, cell[:, None].expand_as(scores), scores.detach(), reduce="amax"
            )
            weights = (scores - cell_max[cell]).exp()  # [N, h]
            total = weights.new_zeros(num_queries, self.heads).index_add(0, cell, weights)
            weights = weights / total[cell]
            pooled = v.new_zeros(num_queries, self.heads, head_dim).index_add(
                0, cell, weights[:, :, None] * v
            )
        pooled = pooled.reshape(num_queries, dim)
        return pooled + self.mlp(self.norm(pooled))


def head_count(dim: int) -> int:
    return math.gcd(dim, 4)


def build_module(
    name: str, new_module: Callable[[], nn.Module], ctx: CompressionContext
) -> nn.Module:
    """A fresh module, initialised from ctx.seed (global RNG untouched), with the model's
    trained weights for `name` loaded when it ships them."""
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        module = new_module()
    load = getattr(ctx.model, "compressor_state", None)
    state = load(name) if load is not None else None
    if state is not None:
        try:
            with torch.inference_mode(False):
                module.load_state_dict({k: v.to(torch.float32).cpu() for k, v in state.items()})
        except RuntimeError as error:
            raise CompressorWeightsError(
                f"the model's trained weights for compressor {name!r} do not fit it as "
                f"configured (retrain it or use its training parameters): "
                f"{str(error).splitlines()[0]}"
            ) from None
    return module


def module_and_question(compressor, tokens: VisualTokens, ctx: CompressionContext) -> tuple[nn.Module, torch.Tensor]:
    """A learned compressor's module for these tokens (built on first use, or again when the
    widths change, then moved to the tokens' device and dtype) and the question vector it is
    conditioned on (from `ctx.model.<compressor.question_source>`)."""
    question = question_vector(ctx, compressor.name, compressor.question_source)
    widths = (tokens.dim, question.numel())
    if compressor.module is None or compressor.module.widths != widths:
        compressor.module = build_module(compressor.name, lambda: compressor.new_module(*widths), ctx)
    return module_on(compressor.module, tokens.embeds), question


def module_on(module: nn.Module, like: torch.Tensor) -> nn.Module:
    """The module moved (in place) to the device and floating dtype of `like`."""
    parameter = next(module.parameters())
    if parameter.device != like.device or parameter.dtype != like.dtype:
        module.to(device=like.device, dtype=like.dtype)
    return module
