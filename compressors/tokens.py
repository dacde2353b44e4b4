"""VisualTokens: the visual tokens of one clip plus where each one came from.

Every stage trades this type: encoders build it with `from_grid`, compressors return a
smaller one through `select` (pruning) or `merge` (pooling, clustering), and the LM runner
reads `embeds` and the ORIGINAL `positions`. Tokens always stay in their original order, and
positions are never renumbered here, so a pruned span keeps the RoPE phases the model would
have given it uncompressed; text after the span continues at `prefix_len + span_length`.

Only shapes and dtypes are validated on construction: range checks on values would force a
device sync on every step of the pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

PositionStyle = Literal["1d", "mrope"]


@dataclass(frozen=True, eq=False)
class VisualTokens:
    """N visual tokens of a clip whose uncompressed token grid is `grid_thw` = (T, H, W)."""

    embeds: torch.Tensor  # [N, D]
    frame_index: torch.Tensor  # [N] int64, frame of the clip (0..T-1)
    grid_rc: torch.Tensor  # [N, 2] int64, (row, col) in the frame's patch grid
    timestamp_s: torch.Tensor  # [N] float64, presentation time of the token's frame
    positions: torch.Tensor  # [N, P] int64, original position ids relative to the span start
    grid_thw: tuple[int, int, int]  # the uncompressed token grid
    span_length: int  # positions the uncompressed span occupies
    score: torch.Tensor | None = None  # [N], set by methods that rank tokens

    def __post_init__(self) -> None:
        _check_tensor("embeds", self.embeds, (None, None), dtype=None)
        n = self.embeds.shape[0]
        _check_tensor("frame_index", self.frame_index, (n,), torch.int64)
        _check_tensor("grid_rc", self.grid_rc, (n, 2), torch.int64)
        _check_tensor("timestamp_s", self.timestamp_s, (n,), torch.float64)
        _check_tensor("positions", self.positions, (n, None), torch.int64)
        if self.positions.shape[1] < 1:
            raise ValueError("positions must have at least one column (P >= 1).")
        if self.score is not None:
            _check_tensor("score", self.score, (n,), dtype=None)
        if (
            not isinstance(self.grid_thw, tuple)
            or len(self.grid_thw) != 3
            or not all(isinstance(x, int) and x >= 1 for x in self.grid_thw)
        ):
            raise ValueError(f"grid_thw must be a tuple of 3 positive ints; got {self.grid_thw!r}.")
        if not isinstance(self.span_length, int) or self.span_length < 1:
            raise ValueError(f"span_length must be a positive int; got {self.span_length!r}.")
        tensors = [self.frame_index, self.grid_rc, self.timestamp_s, self.positions]
        if self.score is not None:
            tensors.append(self.score)
        for t in tensors:
            if t.device != self.embeds.device:
                raise ValueError(
                    f"all tensors must be on the embeds' device {self.embeds.device}; "
                    f"found one on {t.device}."
                )

    @classmethod
    def from_grid(
        cls,
        embeds: torch.Tensor,
        timestamps_s: torch.Tensor | Sequence[float],
        position_style: PositionStyle = "1d",
    ) -> VisualTokens:
        """All tokens of a clip, row-major frame by frame.

        embeds: [T, H, W, D]; timestamps_s: [T] presentation time of each frame.
        position_style "1d": positions = arange(N), span_length = T*H*W (P = 1).
        position_style "mrope": positions = (t, row, col) as Qwen2-VL gives a video's tokens,
        span_length = max(position) + 1 = max(T, H, W) (P = 3).
        """
        if embeds.dim() != 4:
            raise ValueError(f"embeds must be [T, H, W, D]; got shape {tuple(embeds.shape)}.")
        t, h, w, d = embeds.shape
        device = embeds.device
        timestamps = torch.as_tensor(timestamps_s, dtype=torch.float64, device=device)
        if tuple(timestamps.shape) != (t,):
            raise ValueError(
                f"timestamps_s must have one entry per frame ({t}); "
                f"got shape {tuple(timestamps.shape)}."
            )
        frame = torch.arange(t, device=device).repeat_interleave(h * w)  # [N]
        row = torch.arange(h, device=device).repeat_interleave(w).repeat(t)  # [N]
        col = torch.arange(w, device=device).repeat(t * h)  # [N]
        if position_style == "1d":
            positions = torch.arange(t * h * w, device=device).unsqueeze(1)  # [N, 1]
            span_length = t * h * w
        elif position_style == "mrope":
            positions = torch.stack([frame, row, col], dim=1)  # [N, 3]
            span_length = max(t, h, w)
        else:
            raise ValueError(f"position_style must be '1d' or 'mrope'; got {position_style!r}.")
        return cls(
            embeds=embeds.reshape(t * h * w, d),
            frame_index=frame,
            grid_rc=torch.stack([row, col], dim=1),
            timestamp_s=timestamps[frame],
            positions=positions,
            grid_thw=(t, h, w),
            span_length=span_length,
        )

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def num_frames(self) -> int:
        """How many distinct frames still have at least one token."""
        return int(torch.unique(self.frame_index).numel())

    @property
    def dim(self) -> int:
        return self.embeds.shape[1]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def select(self, idx: torch.Tensor | Sequence[int]) -> VisualTokens:
        """The tokens at `idx`, in their original order, metadata and positions unchanged.

        idx: [K] unique indices in [0, N) in any order (sorted here), or a bool mask [N].
        """
        idx = torch.as_tensor(idx, device=self.device)
        if idx.dtype == torch.bool:
            if tuple(idx.shape) != (len(self),):
                raise ValueError(f"a bool mask must be [N={len(self)}]; got {tuple(idx.shape)}.")
            idx = idx.nonzero().squeeze(1)
        if idx.dim() != 1 or (idx.numel() > 0 and idx.is_floating_point()):
            raise ValueError(
                f"idx must be a 1-D integer tensor; got {idx.dtype} {tuple(idx.shape)}."
            )
        idx = idx.long().sort().values
        if idx.numel() > 0:
            if idx[0] < 0 or idx[-1] >= len(self):
                raise ValueError(f"select indices must lie in [0, {len(self)}).")
            if bool((idx[1:] == idx[:-1]).any()):
                raise ValueError("select indices must be unique.")
        return self._take(idx, self.embeds[idx])

    def merge(self, groups: torch.Tensor, weights: torch.Tensor) -> VisualTokens:
        """One token per group: the weighted mean of its members' embeddings.

        groups: [N] int64 in [0, G), every group non-empty. weights: [N] >= 0, normalised
        within each group (a group whose weights are all zero takes the plain mean).
        Frame, grid, timestamp, positions and score come from each group's representative,
        the member with the largest weight (ties: lowest index); the G output tokens are
        ordered by their representative's original index.
        """
        n = len(self)
        groups = torch.as_tensor(groups, device=self.device)
        weights = torch.as_tensor(weights, device=self.device)
        if tuple(groups.shape) != (n,) or groups.is_floating_point() or groups.dtype == torch.bool:
            raise ValueError(
                f"groups must be an integer tensor [N={n}]; got {groups.dtype} "
                f"{tuple(groups.shape)}."
            )
        if tuple(weights.shape) != (n,):
            raise ValueError(f"weights must be [N={n}]; got {tuple(weights.shape)}.")
        if n == 0:
            return self
        groups = groups.long()
        if groups.min() < 0:
            raise ValueError("groups must be >= 0.")
        num_groups = int(groups.max()) + 1
        counts = torch.bincount(groups, minlength=num_groups)  # [G]
        if bool((counts == 0).any()):
            raise ValueError(f"every group in [0, {num_groups}) must have at least one member.")
        acc_dtype = torch.promote_types(self.embeds.dtype, torch.float32)
        weights = weights.to(acc_dtype)
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be finite and >= 0.")

        weight_sum = torch.zeros(num_groups, dtype=acc_dtype, device=self.device)
        weight_sum.index_add_(0, groups, weights)  # [G]
        # Groups whose weights are all zero fall back to equal weights (the plain mean).
        unweighted = weight_sum == 0  # [G]
        weights_eff = torch.where(unweighted[groups], torch.ones_like(weights), weights)  # [N]
        denom = torch.where(unweighted, counts.to(acc_dtype), weight_sum)  # [G]
        summed = torch.zeros(num_groups, self.dim, dtype=acc_dtype, device=self.device)
        summed.index_add_(0, groups, self.embeds.to(acc_dtype) * weights_eff[:, None])
        merged = (summed / denom[:, None]).to(self.embeds.dtype)  # [G, D]

        # Representative: the largest weight in the group, ties broken by lowest index.
        max_weight = torch.full((num_groups,), -1.0, dtype=acc_dtype, device=self.device)
        max_weight = max_weight.scatter_reduce(0, groups, weights, reduce="amax")  # [G]
        index = torch.arange(n, device=self.device)
        candidate = torch.where(weights == max_weight[groups], index, n)  # [N]
        representative = torch.full((num_groups,), n, dtype=torch.long, device=self.device)
        representative = representative.scatter_reduce(0, groups, candidate, reduce="amin")  # [G]

        order = representative.argsort()  # output in original order
        return self._take(representative[order], merged[order])

    def with_embeds(self, embeds: torch.Tensor) -> VisualTokens:
        """Same tokens and metadata, new embeddings [N, D'] (e.g. after a projector)."""
        return dataclasses.replace(self, embeds=embeds)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> VisualTokens:
        """Move every tensor to `device`; `dtype` applies to embeds only, metadata keeps its own."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device)

        return dataclasses.replace(
            self,
            embeds=self.embeds.to(device=device, dtype=dtype),
            frame_index=move(self.frame_index),
            grid_rc=move(self.grid_rc),
            timestamp_s=move(self.timestamp_s),
            positions=move(self.positions),
            score=move(self.score),
        )

    def _take(self, idx: torch.Tensor, embeds: torch.Tensor) -> VisualTokens:
        """Metadata of the tokens at `idx` (sorted, unique) around new `embeds` [len(idx), D]."""
        return dataclasses.replace(
            self,
            embeds=embeds,
            frame_index=self.frame_index[idx],
            grid_rc=self.grid_rc[idx],
            timestamp_s=self.timestamp_s[idx],
            positions=self.positions[idx],
            score=None if self.score is None else self.score[idx],
        )


def _check_tensor(
    name: str, t: torch.Tensor, shape: tuple[int | None, ...], dtype: torch.dtype | None
) -> None:
    """Raise ValueError unless `t` is a tensor of `shape` (None: any size) and `dtype`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}.")
    matches = t.dim() == len(shape) and all(
        want is None or got == want for got, want in zip(t.shape, shape)
    )
    if not matches:
        wanted = ", ".join("*" if want is None else str(want) for want in shape)
        raise ValueError(f"{name} must have shape [{wanted}]; got {list(t.shape)}.")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}; got {t.dtype}.")
