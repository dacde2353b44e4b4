"""The Compressor protocol: what every visual-token compressor looks like from outside.

A compressor is a dataclass whose fields are its parameters, registered by name with
`register_compressor` (see registry.py). Two stages exist:

- "pre_llm" methods act on encoder / projector output and implement `compress`, a pure
  function of (tokens, ctx) and the method's own weights: no globals, no I/O, deterministic
  under `ctx.seed`.
- "in_llm" methods (FastV, CoreMatching) act inside the language model: `hook(ctx, num_layers)`
  returns a `PruneHook` that the LM runner calls after each layer it names, with what it asked
  for (that layer's text->token attention, or its FFN activations); the hook answers which
  tokens go on to the later layers. A pre-LLM method may offer a hook too (ToDRE's stage 2).
  The types the runner and the hooks trade live here, below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from compressors.context import CompressionContext
from compressors.tokens import VisualTokens

Stage = Literal["pre_llm", "in_llm"]


class Compressor(Protocol):
    name: str  # the registered name, set by register_compressor
    stage: Stage
    trainable: bool  # True when the method has learned weights
    uses_question: bool  # True when compress() reads ctx.question: its output cannot be shared across questions

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        """Fewer (or as many) tokens, keeping the metadata of the ones that survive.

        The budget to meet is `ctx.budget`; methods whose size is set by their own parameters
        (e.g. a pooling factor) say so in their docstring.
        """
        ...


@dataclass
class LayerObservation:
    """What a prune hook sees after its layer, about the chunk of tokens being prefilled."""

    layer: int
    is_visual: torch.Tensor  # [L] bool
    frame_index: torch.Tensor  # [L] int64, -1 for text
    # [Q, L]: attention probabilities (mean over heads) of the chunk's text tokens after its
    # last visual token (the question; the last token when there is none) over the chunk.
    text_attention: torch.Tensor | None = None
    ffn_activations: torch.Tensor | None = None  # [L, I] act(gate(x)) * up(x), the FFN's hidden units


class PruneHook(Protocol):
    """Called by the LM runner during prefill. A hook may also define
    `decode_neurons(layer, activations [L, I]) -> LongTensor | None`: the runner then calls it
    at every layer and decodes with the FFN restricted to the units it returns (CoreMatching)."""

    layers: tuple[int, ...]  # observe these layers; tokens not kept skip every later layer
    wants: Literal["attention", "ffn"]

    def select(self, observation: LayerObservation) -> torch.Tensor:
        """[L] bool: which of the chunk's tokens go on to the later layers (text always does)."""
        ...
