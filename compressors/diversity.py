"""Diversity selection: greedy k-center (max-min) over visual tokens, as `todre` and `divprune`.

Both keep the tokens that best cover the clip's feature space. Distance is `1 - cosine`.
The seed is the most isolated token (the largest distance to its nearest neighbour); then,
one at a time, the token farthest from everything chosen so far joins. A running vector of
each token's distance to the chosen set makes a step O(N·D), the whole selection O(k·N·D),
and no N×N matrix is ever held: the seed's nearest-neighbour pass walks the similarity matrix
in row chunks of at most `SIMILARITY_CHUNK_ELEMENTS` entries.

Ties (equal distances) go to the lowest token index, so the selection is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compressors.budget import Budget
from compressors.context import CompressionContext
from compressors.registry import SpecError, register_compressor
from compressors.relevance import TaskRelevanceHook
from compressors.tokens import VisualTokens

SIMILARITY_CHUNK_ELEMENTS = 1 << 22  # entries of one [rows, N] similarity block (16 MiB in fp32)


def nearest_neighbour_distance(unit: torch.Tensor) -> torch.Tensor:
    """unit [N, D] L2-normalised rows -> [N] cosine distance of each row to its nearest other row.

    A single row has no neighbour: its distance is +inf.
    """
    n = unit.shape[0]
    rows_per_chunk = max(1, SIMILARITY_CHUNK_ELEMENTS // max(n, 1))
    nearest = torch.empty(n, dtype=unit.dtype, device=unit.device)
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        similarity = unit[start:stop] @ unit.T  # [rows, N]
        rows = torch.arange(stop - start, device=unit.device)
        similarity[rows, start + rows] = -torch.inf  # a token is not its own neighbour
        nearest[start:stop] = 1 - similarity.amax(dim=1)
    return nearest


def select_diverse_tokens(embeds: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy k-center over embeds [N, D]: indices [keep] in the order they were chosen.

    Computed in float32 (float64 when the input is float64). Tokens of zero norm sit at
    distance 1 from everything.
    """
    n = embeds.shape[0]
    keep = min(keep, n)
    compute_dtype = torch.promote_types(embeds.dtype, torch.float32)
    unit = F.normalize(embeds.detach().to(compute_dtype), dim=1)  # [N, D]
    chosen = torch.empty(keep, dtype=torch.long, device=embeds.device)
    if keep == 0:
        return chosen
    # Indices stay on the device (no .item()): no host sync per step on GPUs.
    index = nearest_neighbour_distance(unit).argmax()  # first maximum: lowest index wins ties
    distance_to_chosen = torch.full((n,), torch.inf, dtype=compute_dtype, device=embeds.device)  # [N]
    for step in range(keep):
        chosen[step] = index
        distance_to_chosen = torch.minimum(distance_to_chosen, 1 - unit @ unit[index])
        distance_to_chosen[index] = -torch.inf  # never chosen twice, even among duplicates
        if step + 1 < keep:
            index = distance_to_chosen.argmax()
    return chosen


def _keep_diverse(tokens: VisualTokens, budget: Budget) -> VisualTokens:
    keep = budget.resolve(len(tokens), tokens.num_frames)
    if keep >= len(tokens):
        return tokens
    return tokens.select(select_diverse_tokens(tokens.embeds, keep))


def _budget_or_default(budget: Budget, default: Budget) -> Budget:
    """`budget`, or `default` when the spec gave no ratio, tokens or per_frame."""
    return default if budget == Budget() else budget


@register_compressor("todre")
@dataclass
class ToDRE:
    """ToDRE: diverse tokens after the encoder (greedy k-center), then task relevance in the LM.

    `compress` is stage 1 only: exactly budget.resolve(N, F) tokens chosen by greedy k-center
    over the whole clip (a per_frame budget sets the total, not a quota per frame). A spec
    without ratio/tokens/per_frame keeps 10% (ToDRE's setting), i.e. `todre` means
    `todre:ratio=0.1`.

    Stage 2 (`stage2=true`: drop the remaining visual tokens inside the LM once the question's
    text->visual attention mass falls below `stage2_threshold`, or before a fixed
    `stage2_layer`) is the prune hook `compressors.relevance.TaskRelevanceHook`.
    """

    stage = "pre_llm"
    trainable = False
    uses_question = False
    default_budget = Budget(ratio=0.1)
    stage2: bool = field(
        default=False, metadata={"help": "also prune visual tokens inside the LM (stage 2)"}
    )
    stage2_layer: int = field(
        default=-1,
        metadata={"help": "LM layer where stage 2 prunes; -1 = the first layer whose "
                          "text->visual attention mass falls below stage2_threshold"},
    )
    stage2_threshold: float = field(
        default=0.05,
        metadata={"help": "text->visual attention mass (0..1) below which stage 2 prunes"},
    )

    def __post_init__(self) -> None:
        if self.stage2_layer < -1:
            raise SpecError(f"todre stage2_layer must be >= -1; got {self.stage2_layer}.")
        if not 0 <= self.stage2_threshold <= 1:
            raise SpecError(
                f"todre stage2_threshold must be in [0, 1]; got {self.stage2_threshold}."
            )

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        return _keep_diverse(tokens, _budget_or_default(ctx.budget, self.default_budget))

    def hook(self, ctx: CompressionContext, num_layers: int) -> TaskRelevanceHook | None:
        """Stage 2, when enabled: observe every layer but the last (or the one before
        `stage2_layer`) and drop the visual tokens there."""
        if not self.stage2:
            return None
        if self.stage2_layer == -1:
            return TaskRelevanceHook(layers=tuple(range(num_layers - 1)), threshold=self.stage2_threshold)
        if not 1 <= self.stage2_layer < num_layers:
            raise SpecError(f"todre stage2_layer={self.stage2_layer} must be in [1, {num_layers - 1}] for this model")
        return TaskRelevanceHook(layers=(self.stage2_layer - 1,), threshold=self.stage2_threshold, fixed_layer=True)


@register_compressor("divprune")
@dataclass
class DivPrune:
    """DivPrune (CVPR 2025): max-min diverse subset of the projected visual tokens.

    Exactly budget.resolve(N, F) tokens over the whole clip; a spec without a budget keeps
    9.8% (the official code's default). Same objective and seed as the reference (the token
    whose nearest-neighbour distance is largest, their 2nd-smallest column entry), with two
    fixes: chosen tokens are masked out (the reference can pick a duplicate token twice) and
    the min-distance vector is kept up to date instead of recomputed over an N×N matrix.
    """

    stage = "pre_llm"
    trainable = False
    uses_question = False
    default_budget = Budget(ratio=0.098)

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        return _keep_diverse(tokens, _budget_or_default(ctx.budget, self.default_budget))
