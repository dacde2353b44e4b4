"""The Compressor protocol: what every visual-token compressor looks like from outside.

A compressor is a dataclass whose fields are its parameters, registered by name with
`register_compressor` (see registry.py). Two stages exist:

- "pre_llm" methods act on encoder / projector output and implement `compress`, a pure
  function of (tokens, ctx) and the method's own weights: no globals, no I/O, deterministic
  under `ctx.seed`.
- "in_llm" methods (FastV, CoreMatching, ToDRE stage 2) will instead implement a hook that the
  LM runner calls at the layers they declare; that hook is defined together with the runner.
"""

from __future__ import annotations

from typing import Literal, Protocol

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
