"""Bi-level routing attention (BiFormer) for causal LMs: routing and the PyTorch paths.

The key slots `0 .. L_k-1` split into R contiguous regions (fixed blocks of tokens, or one
region per video frame / text run). Attention then happens at two levels:

1. Routing, region to region. Region query `Q_r` = mean of the queries in region r, region
   key `K_c` = mean of the keys in region c, affinity `A = Q_r K_c^T`. Query region r reads:
   - its own region (causally inside it),
   - every earlier region marked forced (attention sinks, text),
   - the `topk` earlier, non-forced regions of highest affinity (equal scores: the earlier
     region first), so at most 1 + forced + topk regions,
   and never a later region.
2. Attention, token to token, only over the slots of the regions routed to.

Grouped-query attention: routing is per KV head. `Q_r` averages the queries of every query
head that shares the KV head, so `A` is the group's mean affinity (scores are linear in q) and
all heads of a group read the same K/V blocks (the Triton kernel loads each block once for
several heads of a group).

Queries are the LAST L_q of the L_k slots (bottom-right causal, as in `kernels.attention`):
L_q == L_k is a prefill, L_q < L_k a chunk appended after a cache, L_q == 1 a decode step.
Routing happens per query REGION, so a token's key set depends on the queries of the later
tokens of its own region (BiFormer's block-level routing); it never reads a later key or value.

Three implementations of the same function:
- `bra_reference`: a dense boolean mask and SDPA. The spec; computes every score.
- `bra_gathered`: per query region, gathers the routed regions' K/V and attends to them only.
  Skips the work of unrouted regions; the CPU path (it copies K/V, the Triton kernel does not).
- `kernels.bra_triton.bra_triton`: block-sparse flash attention reading K/V tiles by index.
The first two route with `route_regions` (the routing spec); the Triton path routes with
`kernels.bra_triton.route_regions_triton`, the same function computed in fewer passes.
`bra_decode` is the one-query case: routing by `q . mean(K_block)`, keeping the newest block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.masks import causal_mask


@dataclass(frozen=True)
class RegionLayout:
    """How L_k key slots split into R contiguous regions.

    Region r holds slots `bounds[r] .. bounds[r + 1] - 1`; `region_of_slot[j]` is j's region.
    """

    bounds: tuple[int, ...]  # R + 1 slot indices, bounds[0] == 0, bounds[-1] == L_k
    region_of_slot: torch.Tensor  # [L_k] int64, on the attention's device

    @classmethod
    def blocks(cls, length: int, block: int, device: torch.device | str = "cpu") -> RegionLayout:
        """Fixed regions of `block` slots from slot 0; the last one may be shorter."""
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        bounds = (*range(0, length, block), length)
        return cls(bounds, torch.arange(length, device=device) // block)

    @classmethod
    def from_region_ids(cls, region_ids: torch.Tensor) -> RegionLayout:
        """Regions from per-slot ids [L_k]: non-decreasing, each run of one id is one region."""
        if region_ids.dim() != 1 or region_ids.numel() == 0:
            raise ValueError(f"region_ids must be a non-empty 1-D tensor, got shape {tuple(region_ids.shape)}")
        step = region_ids[1:] - region_ids[:-1]
        if bool((step < 0).any()):
            raise ValueError("region_ids must be non-decreasing (regions are contiguous runs of slots)")
        starts_new = torch.cat([region_ids.new_ones(1, dtype=torch.bool), step > 0])  # [L_k]
        region_of_slot = torch.cumsum(starts_new.long(), 0) - 1
        starts = torch.nonzero(starts_new).flatten().tolist()
        return cls((*starts, region_ids.numel()), region_of_slot)

    @property
    def num_regions(self) -> int:
        return len(self.bounds) - 1

    @property
    def length(self) -> int:
        return self.bounds[-1]

    def regions_holding(self, slot_mask: torch.Tensor) -> torch.Tensor:
        """[R] bool: regions with at least one True slot in `slot_mask` [L_k]."""
        device = self.region_of_slot.device
        held = torch.zeros(self.num_regions, dtype=torch.bool, device=device)
        return held.index_fill_(0, self.region_of_slot[slot_mask.to(device)], True)

    def first_regions(self, count: int) -> torch.Tensor:
        """[R] bool: the first `count` regions (attention sinks)."""
        return torch.arange(self.num_regions, device=self.region_of_slot.device) < count


def frame_regions(frame_index: torch.Tensor) -> torch.Tensor:
    """Region ids [L] for one region per frame: a new region wherever `frame_index` [L] changes.

    A run of text slots (any id the frames do not use, e.g. -1) becomes a region of its own.
    """
    changes = torch.cat([frame_index.new_zeros(1), (frame_index[1:] != frame_index[:-1]).long()])
    return torch.cumsum(changes, 0)


def route_regions(
    query: torch.Tensor,
    key: torch.Tensor,
    layout: RegionLayout,
    *,
    topk: int,
    forced_regions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which key regions each query region reads.

    query: [B, H_q, L_q, D]; key: [B, H_kv, L_k, D]; forced_regions: [R] bool.
    Returns routed [B, H_kv, R, R] bool, routed[b, g, r, c] = query region r reads region c.
    Rows of regions holding no query are their own region only.
    """
    batch, num_q_heads, query_len, head_dim = query.shape
    num_kv_heads, key_len = key.shape[1], key.shape[2]
    group = num_q_heads // num_kv_heads
    if layout.length != key_len:
        raise ValueError(f"region layout covers {layout.length} slots, the keys {key_len}")

    # Region means; the group's query heads are averaged along with the region's tokens.
    # Query slots are the suffix from `offset`: regions before it hold no query (mean 0).
    offset = key_len - query_len
    grouped_query = query.view(batch, num_kv_heads, group, query_len, head_dim).float().mean(2)
    region_query = _region_mean(grouped_query, [max(0, bound - offset) for bound in layout.bounds])  # [B, H_kv, R, D]
    region_key = _region_mean(key, list(layout.bounds))  # [B, H_kv, R, D]
    affinity = region_query @ region_key.transpose(-1, -2)  # [B, H_kv, R, R]
    return pick_regions(affinity, topk, forced_regions)


def pick_regions(affinity: torch.Tensor, topk: int, forced_regions: torch.Tensor | None = None) -> torch.Tensor:
    """routed [..., R, R] bool from region scores [..., R, R]: each query region reads itself,
    the earlier regions in `forced_regions` ([R] bool), and its `topk` best-scoring other
    earlier regions; equal scores go to the earlier region. Shared by both routings."""
    num_regions, device = affinity.shape[-1], affinity.device
    region = torch.arange(num_regions, device=device)
    earlier = region[None, :] < region[:, None]  # [R, R], key region before query region
    if forced_regions is None:
        forced_regions = torch.zeros(num_regions, dtype=torch.bool, device=device)
    forced = earlier & forced_regions[None, :]
    candidate = earlier & ~forced_regions[None, :]
    scores = affinity.masked_fill(~candidate, float("-inf"))
    # The k-th best score by torch.topk (no full sort), then ties at it filled in region order.
    picks = min(topk, num_regions)
    kth = scores.topk(picks, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [..., R, 1]
    above = scores > kth
    tied = (scores == kth) & candidate
    room = picks - above.sum(-1, keepdim=True)  # places left for regions scoring exactly the k-th
    picked = (above | (tied & (tied.cumsum(-1) <= room))) & candidate
    own = region[:, None] == region[None, :]
    return own | forced | picked


def routed_slot_mask(routed: torch.Tensor, layout: RegionLayout, query_len: int) -> torch.Tensor:
    """Token-level mask [B, H_kv, L_q, L_k]: routed region pair and causal (bottom-right)."""
    key_len = layout.length
    query_regions = layout.region_of_slot[key_len - query_len :]  # [L_q]
    pairs = routed[:, :, query_regions][:, :, :, layout.region_of_slot]  # [B, H_kv, L_q, L_k]
    return pairs & causal_mask(query_len, key_len, routed.device)


def bra_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    topk: int,
    layout: RegionLayout,
    forced_regions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bi-level routing attention with a dense mask: the spec every fast path is tested against.

    query: [B, H_q, L_q, D]; key, value: [B, H_kv, L_k, D]; forced_regions: [R] bool.
    Returns [B, H_q, L_q, D]. Memory and time grow as L_q * L_k.
    """
    routed = route_regions(query, key, layout, topk=topk, forced_regions=forced_regions)
    group = query.shape[1] // key.shape[1]
    mask = routed_slot_mask(routed, layout, query.shape[2]).repeat_interleave(group, dim=1)  # [B, H_q, L_q, L_k]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def bra_gathered(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    topk: int,
    layout: RegionLayout,
    forced_regions: torch.Tensor | None = None,
    max_gathered: int = 1 << 20,
) -> torch.Tensor:
    """Bi-level routing attention that only computes routed scores (same result as the spec).

    BiFormer's layout: each query region's routed key regions are gathered into one padded
    K/V sequence, its own region FIRST so that causality inside it is one fixed [W, W]
    triangle, then the others in slot order. Regions are padded to the longest one (W slots).
    All query regions of a step run as batched matmuls, the group's query heads folded into
    the query length; a step takes as many query regions as keep a gathered K below
    `max_gathered` elements. Computes in float32. Copies K/V (the Triton kernel does not):
    this is the CPU path.
    """
    batch, num_q_heads, query_len, head_dim = query.shape
    num_kv_heads, key_len = key.shape[1], key.shape[2]
    group, offset, device = num_q_heads // num_kv_heads, key_len - query_len, query.device
    num_regions = layout.num_regions
    routed = route_regions(query, key, layout, topk=topk, forced_regions=forced_regions)  # [B, H_kv, R, R]

    bounds = torch.tensor(layout.bounds, device=device)
    starts, sizes = bounds[:-1], bounds[1:] - bounds[:-1]  # [R]
    width = max(b - a for a, b in zip(layout.bounds[:-1], layout.bounds[1:]))
    within = torch.arange(width, device=device)  # [W]

    # Regions each query region reads: its own, then the other routed ones in order, padded
    # with region R, which is empty. Then their slots, each region padded to W.
    region = torch.arange(num_regions, device=device)
    others = routed & (region[:, None] != region[None, :])  # [B, H_kv, R, R]
    most_others = int(others.sum(-1).max())
    listed_others = torch.where(others, region, num_regions).sort(-1).values[..., :most_others]
    own = region[:, None].expand(batch, num_kv_heads, num_regions, 1)
    listed = torch.cat([own, listed_others], -1)  # [B, H_kv, R, S]
    list_starts, list_sizes = F.pad(starts, (0, 1))[listed], F.pad(sizes, (0, 1))[listed]  # [B, H_kv, R, S]
    key_ok = (within < list_sizes[..., None]).flatten(-2)  # [B, H_kv, R, N = S * W]
    key_slots = torch.where(key_ok, (list_starts[..., None] + within).flatten(-2), 0)  # [B, H_kv, R, N]
    reads = key_slots.shape[-1]
    future = within[None, :] > within[:, None]  # [W, W]: own-region key after the query row

    # Query slots of each region, padded to W; padding rows are computed and dropped.
    query_slots = starts[:, None] + within  # [R, W]
    query_ok = (within < sizes[:, None]) & (query_slots >= offset)  # [R, W]

    # Rows of flat K/V are (batch, KV head, slot): index_select on them is a fast gather.
    flat_key, flat_value = key.reshape(-1, head_dim), value.reshape(-1, head_dim)  # [B * H_kv * L_k, D]
    row_base = torch.arange(batch * num_kv_heads, device=device).view(batch, num_kv_heads, 1, 1) * key_len
    out = torch.empty_like(query)
    first = int(layout.region_of_slot[offset])
    step = max(1, max_gathered // (batch * num_kv_heads * reads * head_dim))
    for lo in range(first, num_regions, step):
        hi = min(lo + step, num_regions)
        count = hi - lo
        cells = batch * num_kv_heads * count  # one (batch, KV head, query region) per matmul
        rows_read = (key_slots[:, :, lo:hi] + row_base).flatten()
        gathered_key = flat_key.index_select(0, rows_read).view(cells, reads, head_dim).float()
        gathered_value = flat_value.index_select(0, rows_read).view(cells, reads, head_dim).float()
        query_rows = (query_slots[lo:hi].clamp(offset, key_len - 1) - offset).flatten()  # [C * W]
        rows = query.index_select(2, query_rows).view(batch, num_kv_heads, group, count, width, head_dim)
        rows = rows.transpose(2, 3).reshape(cells, group * width, head_dim).float()

        padding = ~key_ok[:, :, lo:hi].reshape(cells, 1, reads)
        bias = torch.zeros(cells, 1, reads, device=device).masked_fill_(padding, float("-inf"))
        scores = torch.baddbmm(bias, rows, gathered_key.transpose(1, 2), alpha=scale)  # [cells, group * W, N]
        scores.view(cells, group, width, reads)[..., :width].masked_fill_(future, float("-inf"))
        attended = torch.softmax(scores, -1) @ gathered_value  # [cells, group * W, D]

        attended = attended.view(batch, num_kv_heads, count, group, width, head_dim).transpose(2, 3)
        attended = attended.reshape(batch, num_q_heads, count * width, head_dim)
        start = max(layout.bounds[lo], offset) - offset
        out[:, :, start : layout.bounds[hi] - offset] = attended[:, :, query_ok[lo:hi].flatten()].to(out.dtype)
    return out


def bra_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    topk: int,
    layout: RegionLayout,
    forced_regions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step over a KV cache: attend to the top-k blocks by `q . mean(K_block)`,
    the newest block (the one holding the query's own slot) and the forced blocks (sinks, text).

    query: [B, H_q, 1, D]; key, value: [B, H_kv, L_k, D]. Returns [B, H_q, 1, D].
    This is routing with a one-token query region, so it is `bra_reference` at L_q == 1; the
    mask is only [B, H_q, 1, L_k]. It still reads every key to form the block means.
    """
    if query.shape[2] != 1:
        raise ValueError(f"bra_decode takes one query token, got {query.shape[2]}")
    return bra_reference(query, key, value, scale=scale, topk=topk, layout=layout, forced_regions=forced_regions)


def _region_mean(values: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Mean of values [B, H, L, D] over slots bounds[r] .. bounds[r+1]-1 -> [B, H, R, D] float32.

    Regions are padded to the longest one and summed along a fixed axis: deterministic on
    CUDA too (index_add_ is not, and a last-bit change could flip a near-tie in routing).
    An empty region's mean is 0.
    """
    starts = torch.tensor(bounds[:-1], device=values.device)  # [R]
    sizes = torch.tensor(bounds[1:], device=values.device) - starts  # [R]
    width = max(1, max(b - a for a, b in zip(bounds[:-1], bounds[1:])))
    offsets = torch.arange(width, device=values.device)  # [W]
    inside = offsets < sizes[:, None]  # [R, W]
    slots = torch.where(inside, starts[:, None] + offsets, 0)  # [R, W]
    batch, heads, _, head_dim = values.shape
    padded = values.index_select(2, slots.flatten()).view(batch, heads, len(sizes), width, head_dim)
    sums = (padded.float() * inside[:, :, None]).sum(3)  # [B, H, R, D]
    return sums / sizes.clamp(min=1)[:, None]
