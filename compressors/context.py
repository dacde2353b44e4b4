"""CompressionContext: everything a compressor may know besides the tokens themselves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from compressors.budget import Budget
from kernels.errors import VidsieveError


class ContextError(VidsieveError):
    """A compressor asked the context for something it cannot give (e.g. no model handle)."""


@dataclass
class CompressionContext:
    """The question, the budget, a seed and a handle to the model, for one compression call.

    `model` is whatever the model adapter offers question-aware methods, e.g.
    `embed_text(text) -> Tensor`; compressors that do not need it never touch it.
    """

    question: str = ""
    question_ids: torch.Tensor | None = None  # [L] int64, the question's LM token ids
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    model: Any = None
    # (question, embedding) of the last lookup; recomputed when the question changes.
    _embedding_cache: tuple[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    @property
    def question_embedding(self) -> torch.Tensor:
        """`model.embed_text(question)`, computed on first use and cached."""
        if self._embedding_cache is None or self._embedding_cache[0] != self.question:
            embed_text = getattr(self.model, "embed_text", None)
            if embed_text is None:
                raise ContextError(
                    "This compressor needs the question's embedding, but the compression "
                    "context has no model handle offering embed_text(text); "
                    "pass model=... to CompressionContext or choose a question-agnostic method."
                )
            self._embedding_cache = (self.question, embed_text(self.question))
        return self._embedding_cache[1]

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh torch.Generator on `device`, seeded with `seed` (same seed, same draws)."""
        return torch.Generator(device=device).manual_seed(self.seed)
