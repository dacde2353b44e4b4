"""Budget: how many visual tokens a compressor may keep.

A budget is one of: a ratio of the tokens it is given, an absolute token count, a count per
frame, or nothing (keep all). Spec strings carry it as `ratio=`, `tokens=` or `per_frame=`,
keys common to every compressor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kernels.errors import VidsieveError


class BudgetError(VidsieveError):
    """A budget that cannot be met: two kinds at once, or a value out of range."""


@dataclass(frozen=True)
class Budget:
    """Exactly one of `ratio`, `tokens`, `per_frame`, or none of them to keep every token."""

    ratio: float | None = None  # 0 < ratio <= 1, fraction of the input tokens
    tokens: int | None = None  # >= 1, tokens for the whole clip
    per_frame: int | None = None  # >= 1, tokens per frame present in the input

    def __post_init__(self) -> None:
        given = {k: v for k, v in vars(self).items() if v is not None}
        if len(given) > 1:
            listed = " and ".join(f"{k}={v}" for k, v in given.items())
            raise BudgetError(
                f"A budget takes at most one of ratio, tokens, per_frame; got {listed}."
            )
        if self.ratio is not None:
            is_number = isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
            if not is_number or not 0 < self.ratio <= 1:
                raise BudgetError(f"Budget ratio must be a number in (0, 1]; got {self.ratio!r}.")
        for key in ("tokens", "per_frame"):
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BudgetError(f"Budget {key} must be an integer >= 1; got {value!r}.")

    def resolve(self, num_tokens: int, num_frames: int) -> int:
        """How many of `num_tokens` tokens (spread over `num_frames` frames) to keep.

        ratio: round(ratio * N) rounded half up; tokens: as given; per_frame: per_frame *
        num_frames; none: N. Always clamped to [1, N] (0 when there are no tokens).
        """
        if num_tokens <= 0:
            return 0
        if self.ratio is not None:
            keep = math.floor(self.ratio * num_tokens + 0.5)
        elif self.tokens is not None:
            keep = self.tokens
        elif self.per_frame is not None:
            keep = self.per_frame * num_frames
        else:
            keep = num_tokens
        return min(max(keep, 1), num_tokens)

    def keeps_all(self, num_tokens: int, num_frames: int) -> bool:
        """Whether this budget leaves `num_tokens` tokens untouched."""
        return self.resolve(num_tokens, num_frames) == num_tokens

    def __str__(self) -> str:
        """The spec-string form: `ratio=0.1`, `tokens=64`, `per_frame=16`, or "" (keep all)."""
        return ",".join(f"{k}={v}" for k, v in vars(self).items() if v is not None)
