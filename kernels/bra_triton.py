"""Bi-level routing attention as a block-sparse flash-attention Triton kernel.

Same function as `kernels.bra.bra_reference` (the spec, which the tests compare against) and
the same routing (`route_regions`, in PyTorch). What differs is how the routed regions are read:

- Slots are cut into tiles of `TILE` tokens (queries and keys alike). For each query tile and
  KV head, `tile_lists` lists the key tiles that hold any slot a row of the tile may read.
- One program per (query tile, query head) walks its list, loads each K/V tile straight from
  the cache by index (no gathered copy), and keeps an online softmax (flash attention).
- Inside a tile it masks by causality and, when regions are not whole tiles, by a lookup of
  (query region, key region) in the routing table. When every region boundary and the query
  offset fall on tile boundaries (fixed blocks that are a multiple of the tile), a listed
  tile is routed as a whole and the lookup is compiled out (`REGION_MASK=False`).

So any region layout works, frames of any size included; aligned layouts are the fast case.
On CPU it runs under `TRITON_INTERPRET=1`, which must be set before this module is imported
(the `@triton.jit` decorator reads it). The interpreter computes bf16 `tl.dot` wrongly; test
with float32 or float16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.bra import RegionLayout, route_regions


def bra_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    topk: int,
    layout: RegionLayout,
    forced_regions: torch.Tensor | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Bi-level routing attention, block-sparse in Triton.

    query: [B, H_q, L_q, D] (the last L_q of L_k slots); key, value: [B, H_kv, L_k, D] with
    stride 1 on D (a KV-cache view is fine); forced_regions: [R] bool. Returns [B, H_q, L_q, D].
    tile: tokens per tile (a power of two >= 16); by default the largest of 64, 32, 16 that
    keeps the layout aligned, else 64 with the region lookup.
    """
    if not query.is_cuda and not isinstance(_bra_forward_kernel, InterpretedFunction):
        raise RuntimeError(
            "bra_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels.bra_triton is imported"
        )
    batch, num_q_heads, query_len, head_dim = query.shape
    num_kv_heads, key_len = key.shape[1], key.shape[2]
    offset = key_len - query_len
    tile = tile or _pick_tile(layout, offset)
    aligned = _is_aligned(layout, offset, tile)
    routed = route_regions(query, key, layout, topk=topk, forced_regions=forced_regions)  # [B, H_kv, R, R]
    tile_index, tile_count = tile_lists(routed, layout, query_len, tile)
    num_q_tiles, max_tiles = tile_index.shape[2], tile_index.shape[3]

    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty_like(query)
    grid = (num_q_tiles, batch * num_q_heads)
    _bra_forward_kernel[grid](
        query, key, value, out,
        tile_index, tile_count,
        layout.region_of_slot[offset:].to(torch.int32).contiguous(),
        layout.region_of_slot.to(torch.int32).contiguous(),
        routed.to(torch.int8).contiguous(),
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
        num_q_heads, num_kv_heads, query_len, key_len, layout.num_regions, num_q_tiles, max_tiles,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        TILE=tile,
        REGION_MASK=not aligned,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out


def tile_lists(
    routed: torch.Tensor, layout: RegionLayout, query_len: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key tiles each query tile must visit, per KV head.

    routed: [B, H_kv, R, R] bool from `route_regions`.
    Returns tile_index [B, H_kv, T_q, M] int32 (ascending, padded past the count) and
    tile_count [B, H_kv, T_q] int32, where T_q = ceil(L_q / tile) and M the longest list.
    A key tile is listed when any of its slots lies in a region that any row of the query
    tile reads, and it starts no later than the tile's last query slot.
    """
    key_len = layout.length
    offset = key_len - query_len
    device = routed.device
    num_regions = layout.num_regions
    num_q_tiles, num_k_tiles = triton.cdiv(query_len, tile), triton.cdiv(key_len, tile)
    query_regions = layout.region_of_slot[offset:]  # [L_q]

    # Region membership of tiles, as 0/1 matrices so the union is two matmuls.
    in_query_tile = torch.zeros(num_q_tiles, num_regions, device=device)  # [T_q, R]
    in_query_tile[torch.arange(query_len, device=device) // tile, query_regions] = 1.0
    in_key_tile = torch.zeros(num_regions, num_k_tiles, device=device)  # [R, T_k]
    in_key_tile[layout.region_of_slot, torch.arange(key_len, device=device) // tile] = 1.0
    needed = (in_query_tile @ routed.float() @ in_key_tile) > 0  # [B, H_kv, T_q, T_k]

    last_query_slot = offset + torch.clamp((torch.arange(num_q_tiles, device=device) + 1) * tile, max=query_len) - 1
    key_tile_start = torch.arange(num_k_tiles, device=device) * tile
    needed &= key_tile_start[None, :] <= last_query_slot[:, None]

    tile_count = needed.sum(-1, dtype=torch.int32)
    max_tiles = max(1, int(tile_count.max()))
    numbered = torch.where(needed, torch.arange(num_k_tiles, device=device), num_k_tiles)
    tile_index = numbered.sort(-1).values[..., :max_tiles].to(torch.int32).contiguous()
    return tile_index, tile_count.contiguous()


def _is_aligned(layout: RegionLayout, offset: int, tile: int) -> bool:
    """True when regions and the query offset fall on tile boundaries (the last region may be ragged)."""
    return offset % tile == 0 and all(bound % tile == 0 for bound in layout.bounds[:-1])


def _pick_tile(layout: RegionLayout, offset: int) -> int:
    for tile in (64, 32, 16):
        if _is_aligned(layout, offset, tile):
            return tile
    return 64


@triton.jit
def _bra_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    tile_index_ptr,  # [B * H_kv, T_q, M] int32
    tile_count_ptr,  # [B * H_kv, T_q] int32
    query_region_ptr,  # [L_q] int32, region of each query slot
    key_region_ptr,  # [L_k] int32, region of each key slot
    routed_ptr,  # [B * H_kv, R, R] int8, routed[query region, key region]
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_q_heads, num_kv_heads, query_len, key_len, num_regions, num_q_tiles, max_tiles,
    scale_log2,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    REGION_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // (num_q_heads // num_kv_heads)
    routing_row = (batch * num_kv_heads + kv_head) * num_q_tiles + q_tile

    rows = q_tile * TILE + tl.arange(0, TILE)  # [TILE] query rows
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < query_len
    dim_ok = dims < HEAD_DIM
    query_slot = rows + (key_len - query_len)  # bottom-right causal alignment
    q = tl.load(
        q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qm + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [TILE, BLOCK_D]
    if REGION_MASK:
        query_region = tl.load(query_region_ptr + rows, mask=row_ok, other=0)  # [TILE]
        routed_base = routed_ptr + (batch * num_kv_heads + kv_head) * num_regions * num_regions

    row_max = tl.full([TILE], float("-inf"), tl.float32)
    row_sum = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, BLOCK_D], tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    num_tiles = tl.load(tile_count_ptr + routing_row)
    for visit in range(0, num_tiles):
        k_tile = tl.load(tile_index_ptr + routing_row * max_tiles + visit)
        cols = k_tile * TILE + tl.arange(0, TILE)  # [TILE] key slots
        col_ok = cols < key_len
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)  # [TILE, BLOCK_D]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [TILE, TILE]

        allowed = col_ok[None, :] & (cols[None, :] <= query_slot[:, None])
        if REGION_MASK:
            key_region = tl.load(key_region_ptr + cols, mask=col_ok, other=0)
            pair = tl.load(
                routed_base + query_region[:, None] * num_regions + key_region[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0,
            )
            allowed = allowed & (pair != 0)
        scores = tl.where(allowed, scores, float("-inf"))

        # Online softmax; a row with nothing allowed yet keeps max -inf, so shift by 0 instead.
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - shift)
        weights = tl.exp2(scores - shift[:, None])  # [TILE, TILE]
        row_sum = row_sum * rescale + tl.sum(weights, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    # Every real row reads at least its own slot, so row_sum > 0 there; padding rows are not stored.
    acc = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    tl.store(
        out_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_om + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
