"""KVState: the keys and values an LM has computed so far, with what each slot is.

One sequence (batch 1; `LMRunner.step_batch` steps several states together). Keys are stored AFTER rotary embedding, so a slot keeps the position
it was computed at forever: evicting other slots never shifts it, and new tokens continue from
`next_position`, the true next position, not from the number of slots kept.

Storage grows by doubling (amortised O(1) appends, as in gpt-fast's preallocated cache) and
is compacted on eviction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT_FRAME = -1  # frame_index of slots that hold text, not video


@dataclass
class KVState:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    position_dims: int = 1  # 1 for RoPE, 3 for Qwen's (t, h, w) M-RoPE
    capacity: int = 256
    length: int = 0
    next_position: int = 0  # where the next appended token's position starts
    # Decode-time FFNs restricted to core neurons, by layer (set by CoreMatching's prune hook).
    ffn_slices: dict = field(default_factory=dict)
    _keys: list[torch.Tensor] = field(default_factory=list, repr=False)  # per layer [H_kv, cap, D]
    _values: list[torch.Tensor] = field(default_factory=list, repr=False)
    _positions: torch.Tensor | None = field(default=None, repr=False)  # [cap, P] int64
    _is_visual: torch.Tensor | None = field(default=None, repr=False)  # [cap] bool
    _frame_index: torch.Tensor | None = field(default=None, repr=False)  # [cap] int64

    def __post_init__(self) -> None:
        shape = (self.num_kv_heads, self.capacity, self.head_dim)
        self._keys = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self._values = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self._positions = torch.empty((self.capacity, self.position_dims), dtype=torch.long, device=self.device)
        self._is_visual = torch.empty(self.capacity, dtype=torch.bool, device=self.device)
        self._frame_index = torch.empty(self.capacity, dtype=torch.long, device=self.device)

    # --- what is stored ---------------------------------------------------------------------

    def keys(self, layer: int) -> torch.Tensor:
        """[1, H_kv, S, D] view of the layer's keys."""
        return self._keys[layer][:, : self.length].unsqueeze(0)

    def values(self, layer: int) -> torch.Tensor:
        """[1, H_kv, S, D] view of the layer's values."""
        return self._values[layer][:, : self.length].unsqueeze(0)

    @property
    def positions(self) -> torch.Tensor:
        """[S, P] position ids each slot was computed at."""
        return self._positions[: self.length]

    @property
    def is_visual(self) -> torch.Tensor:
        """[S] True for slots holding visual tokens."""
        return self._is_visual[: self.length]

    @property
    def frame_index(self) -> torch.Tensor:
        """[S] source frame of each visual slot, TEXT_FRAME for text."""
        return self._frame_index[: self.length]

    def nbytes(self) -> int:
        """Bytes held by live keys and values (what eviction saves), not the spare capacity."""
        per_slot = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self._keys[0].element_size()
        return per_slot * self.length

    def allocated_bytes(self) -> int:
        """Bytes reserved including spare capacity."""
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)

    # --- changing it ------------------------------------------------------------------------

    def reserve(self, positions: torch.Tensor, is_visual: torch.Tensor, frame_index: torch.Tensor) -> slice:
        """Claim slots for L new tokens (positions [L, P]); layers then `write` into them."""
        new_length = self.length + positions.shape[0]
        if new_length > self.capacity:
            self._grow(max(new_length, 2 * self.capacity))
        slots = slice(self.length, new_length)
        self._positions[slots] = positions.to(self.device)
        self._is_visual[slots] = is_visual.to(self.device)
        self._frame_index[slots] = frame_index.to(self.device)
        self.length = new_length
        return slots

    def write(self, layer: int, slots: slice, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store one layer's keys/values [H_kv, L, D] into slots claimed by `reserve`."""
        self._keys[layer][:, slots] = key
        self._values[layer][:, slots] = value

    def evict(self, keep: torch.Tensor) -> int:
        """Keep only slots where `keep` [S] is True (order preserved). Returns slots freed."""
        if keep.shape != (self.length,):
            raise ValueError(f"keep mask must have shape ({self.length},), got {tuple(keep.shape)}")
        index = keep.nonzero().squeeze(1).to(self.device)
        kept = index.numel()
        for store in (self._keys, self._values):
            for layer, tensor in enumerate(store):
                tensor[:, :kept] = tensor[:, index]
        for tensor in (self._positions, self._is_visual, self._frame_index):
            tensor[:kept] = tensor[index]
        freed = self.length - kept
        self.length = kept
        return freed

    def truncate(self, length: int) -> None:
        """Drop every slot from `length` on (e.g. a question's tokens after it was answered)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} slots to {length}")
        self.length = length

    def _grow(self, capacity: int) -> None:
        def grown(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[dim] = capacity
            bigger = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            bigger.narrow(dim, 0, self.length).copy_(tensor.narrow(dim, 0, self.length))
            return bigger

        self._keys = [grown(t, 1) for t in self._keys]
        self._values = [grown(t, 1) for t in self._values]
        self._positions = grown(self._positions, 0)
        self._is_visual = grown(self._is_visual, 0)
        self._frame_index = grown(self._frame_index, 0)
        self.capacity = capacity
