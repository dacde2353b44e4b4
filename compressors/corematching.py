"""CoreMatching: token and neuron co-sparsity from one FFN's gated activations.

In a gated FFN, A = act(gate(x)) * up(x) [L, I]:
- a token's core neurons are the units whose activation is above the `rho` quantile of that
  token's positive activations;
- the sentence's core neurons are the `beta` fraction of units most often core across the
  text tokens;
- a visual token's score is how many of the sentence's core neurons are among its own;
  tokens are cut at the elbow of the sorted scores (the point farthest from the chord
  between the highest and lowest score), or at the budget when the spec sets one.

Prefill: from the next layer on, non-core visual tokens are removed (not zeroed: they leave
the sequence and the cache). Decode: each layer's FFN is computed on the slice of its
weights that holds the sentence's core neurons of that layer (`vlm.lm_runner.SlicedFFN`),
`beta` of the dense FFN's multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressors.budget import Budget
from compressors.context import CompressionContext
from compressors.protocol import LayerObservation
from compressors.registry import SpecError, register_compressor
from compressors.tokens import VisualTokens


@register_compressor("corematching")
@dataclass
class CoreMatching:
    """CoreMatching: keep visual tokens whose core FFN neurons match the sentence's; decode on core neurons."""

    stage = "in_llm"
    trainable = False
    uses_question = True
    layer: int = field(default=1, metadata={"help": "the FFN layer whose activations choose tokens"})
    rho: float = field(default=0.8, metadata={"help": "token core neurons: above this quantile of its positive activations"})
    beta: float = field(default=0.2, metadata={"help": "sentence core neurons: this fraction of units, most frequent first"})
    sparse_decode: bool = field(default=True, metadata={"help": "decode with the FFN sliced to core neurons"})

    def __post_init__(self) -> None:
        if not 0 <= self.rho < 1 or not 0 < self.beta <= 1:
            raise SpecError(f"corematching: need 0 <= rho < 1 and 0 < beta <= 1, got rho={self.rho}, beta={self.beta}")
        if self.layer < 0:
            raise SpecError(f"corematching: layer must be >= 0, got {self.layer}")

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        """Nothing happens before the LM; see `hook`."""
        return tokens

    def hook(self, ctx: CompressionContext, num_layers: int) -> "CoreMatchingHook":
        if self.layer >= num_layers - 1:
            raise SpecError(f"corematching: layer={self.layer} leaves no later layer to prune "
                            f"(the model has {num_layers})")
        return CoreMatchingHook((self.layer,), ctx.budget, self.rho, self.beta, self.sparse_decode)


def core_neurons(activations: torch.Tensor, rho: float) -> torch.Tensor:
    """[L, I] -> [L, I] bool: each token's units above the rho quantile of its positive activations."""
    positive = activations.clamp(min=0)
    masked = torch.where(positive > 0, positive, torch.nan)
    threshold = torch.nanquantile(masked.float(), rho, dim=-1, keepdim=True)  # [L, 1]; NaN if none positive
    return (positive > 0) & (positive >= threshold.nan_to_num(float("inf")))


def sentence_core_neurons(token_cores: torch.Tensor, beta: float) -> torch.Tensor:
    """[L, I] bool -> [K] unit indices: the beta fraction most often core (ties: lower index)."""
    counts = token_cores.sum(0)  # [I]
    keep = max(1, round(beta * counts.numel()))
    order = torch.argsort(counts, descending=True, stable=True)
    return order[:keep].sort().values


def elbow_count(scores_desc: torch.Tensor) -> int:
    """How many of the descending scores lie before the elbow: the point farthest from the
    chord joining the first and last score (at least 1)."""
    n = scores_desc.numel()
    if n <= 2:
        return n
    x = torch.linspace(0, 1, n, device=scores_desc.device)
    span = scores_desc[0] - scores_desc[-1]
    y = (scores_desc - scores_desc[-1]) / span if span > 0 else torch.zeros_like(scores_desc)
    distance = (1 - x - y).abs()  # distance to the chord y = 1 - x, up to a constant factor
    return int(distance.argmax()) + 1


@dataclass
class CoreMatchingHook:
    layers: tuple[int, ...]
    budget: Budget
    rho: float
    beta: float
    sparse_decode: bool
    wants: str = "ffn"

    def select(self, observation: LayerObservation) -> torch.Tensor:
        visual = observation.is_visual
        activations = observation.ffn_activations  # [L, I]
        cores = core_neurons(activations, self.rho)
        sentence = sentence_core_neurons(cores[~visual], self.beta)
        visual_at = visual.nonzero()[:, 0]
        scores = cores[visual_at][:, sentence].sum(-1).float()  # [N_visual] overlap with the sentence
        order = torch.argsort(scores, descending=True, stable=True)
        frames = int(observation.frame_index[visual].unique().numel())
        count = (self.budget.resolve(len(visual_at), frames) if self.budget != Budget()
                 else elbow_count(scores[order]))
        keep = ~visual.clone()
        keep[visual_at[order[:count]]] = True
        return keep

    def decode_neurons(self, layer: int, activations: torch.Tensor) -> torch.Tensor | None:
        """The prompt's core neurons at `layer` (over all its tokens), for the sliced decode FFN."""
        if not self.sparse_decode:
            return None
        return sentence_core_neurons(core_neurons(activations, self.rho), self.beta)
