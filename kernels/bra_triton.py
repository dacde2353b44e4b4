"""Bi-level routing attention as a block-sparse flash-attention Triton kernel.

Same function as `kernels.bra.bra_reference` (the spec, which the tests compare against). The
work splits in three, none of which waits on the host:

1. Routing (`route_regions_triton`, the same function as `kernels.bra.route_regions`): one
   kernel reads q and k once for the region means, one fp32 matmul scores region pairs, and
   `torch.topk` picks the regions. At 32k tokens that is 512 x 512 scores per KV head, so
   only the region means touch much memory.
2. Tile lists (`tile_lists`): slots are cut into tiles of `TILE` tokens (queries and keys
   alike). For each query tile and KV head, the key tiles that hold any slot a row of the
   tile may read, in slot order.
3. Attention: one program per (query tile, `HEADS` query heads of one KV group) walks its
   list, loads each K/V tile straight from the cache by index (no gathered copy) once for
   all its heads, and keeps an online softmax (flash attention, in exp2).

When every region boundary and the query offset fall on tile boundaries (fixed blocks that
are a multiple of the tile), a listed tile is routed as a whole: every tile but the last
(the diagonal one) is fully visible and runs without any mask. Otherwise each tile is masked
by causality and a lookup of (query region, key region) in the routing table
(`REGION_MASK`), so any region layout works, frames of any size included.

Launch settings (`HEADS`, warps, pipeline stages) are autotuned once per shape class on
large problems; small ones take one fixed setting. On CPU it runs under `TRITON_INTERPRET=1`,
which must be set before this module is imported (the `@triton.jit` decorator reads it). The
interpreter computes bf16 `tl.dot` wrongly; test with float32 or float16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.bra import RegionLayout, pick_regions

LOG2_E = 1.4426950408889634


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
    if not query.is_cuda and not runs_interpreted():
        raise RuntimeError(
            "bra_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels.bra_triton is imported"
        )
    batch, num_q_heads, query_len, head_dim = query.shape
    num_kv_heads, key_len = key.shape[1], key.shape[2]
    offset = key_len - query_len
    tile = tile or _pick_tile(layout, offset)
    aligned = _is_aligned(layout, offset, tile)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    routed = route_regions_triton(query, key, layout, topk=topk, forced_regions=forced_regions)  # [B, H_kv, R, R]
    tile_index, tile_count = tile_lists(routed, layout, query_len, tile)
    num_q_tiles = tile_index.shape[2]

    if aligned:  # the kernel never looks regions up: pass any int32 / int8 tensors
        query_regions = key_regions = tile_count
        routed_bytes = tile_count
    else:
        query_regions = layout.region_of_slot[offset:].to(torch.int32).contiguous()
        key_regions = layout.region_of_slot.to(torch.int32).contiguous()
        routed_bytes = routed.to(torch.int8).contiguous()
    out = torch.empty_like(query)
    grid = lambda meta: (num_q_tiles, batch * num_q_heads // meta["HEADS"])  # noqa: E731
    _bra_forward_kernel[grid](
        query, key, value, out,
        tile_index, tile_count, query_regions, key_regions, routed_bytes,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *out.stride()[:3],
        num_q_heads, num_kv_heads, query_len, key_len, layout.num_regions, num_q_tiles, tile_index.shape[3],
        scale * LOG2_E,  # the kernel uses exp2
        query_len.bit_length(),  # autotuning runs once per power-of-two class of lengths
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        TILE=tile,
        REGION_MASK=not aligned,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out


def route_regions_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    layout: RegionLayout,
    *,
    topk: int,
    forced_regions: torch.Tensor | None = None,
) -> torch.Tensor:
    """`kernels.bra.route_regions` on the GPU: routed [B, H_kv, R, R] bool, the same function.

    Region means come from one kernel that reads q and k once (fp32 sums in a fixed order, so
    deterministic; the last bits may differ from the reference's order); the regions are then
    picked by `kernels.bra.pick_regions`, as in the reference.
    """
    batch, num_q_heads, query_len, head_dim = query.shape
    num_kv_heads, key_len = key.shape[1], key.shape[2]
    num_regions, device = layout.num_regions, query.device
    if layout.length != key_len:
        raise ValueError(f"region layout covers {layout.length} slots, the keys {key_len}")
    bounds = torch.searchsorted(layout.region_of_slot, torch.arange(num_regions + 1, device=device))  # [R + 1]

    region_query = torch.empty(batch, num_kv_heads, num_regions, head_dim, device=device)  # [B, H_kv, R, D]
    region_key = torch.empty_like(region_query)
    _region_means_kernel[(num_regions, batch * num_kv_heads)](
        query, key, bounds, region_query, region_key,
        *query.stride()[:3], *key.stride()[:3],
        num_kv_heads, num_q_heads // num_kv_heads, key_len - query_len,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_L=64,
    )
    affinity = region_query @ region_key.transpose(-1, -2)  # [B, H_kv, R, R]
    return pick_regions(affinity, topk, forced_regions)


def tile_lists(
    routed: torch.Tensor, layout: RegionLayout, query_len: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key tiles each query tile must visit, per KV head.

    routed: [B, H_kv, R, R] bool from the routing.
    Returns tile_index [B, H_kv, T_q, T_k] int32 (ascending, padded past the count with the
    last tile) and tile_count [B, H_kv, T_q] int32, where T = ceil(L / tile).
    A key tile is listed when any of its slots lies in a region that any row of the query
    tile reads, and it starts no later than the tile's last query slot.
    """
    key_len = layout.length
    offset = key_len - query_len
    device = routed.device
    num_q_tiles, num_k_tiles = triton.cdiv(query_len, tile), triton.cdiv(key_len, tile)
    query_regions = layout.region_of_slot[offset:]  # [L_q]

    if _is_aligned(layout, offset, tile):
        # Each tile lies in one region: look the pairs up by the tiles' first slots.
        needed = routed[:, :, query_regions[::tile]][:, :, :, layout.region_of_slot[::tile]]  # [B, H_kv, T_q, T_k]
    else:
        # Region membership of tiles, as 0/1 matrices so the union is two matmuls.
        in_query_tile = torch.zeros(num_q_tiles, layout.num_regions, device=device)  # [T_q, R]
        in_query_tile[torch.arange(query_len, device=device) // tile, query_regions] = 1.0
        in_key_tile = torch.zeros(layout.num_regions, num_k_tiles, device=device)  # [R, T_k]
        in_key_tile[layout.region_of_slot, torch.arange(key_len, device=device) // tile] = 1.0
        needed = (in_query_tile @ routed.float() @ in_key_tile) > 0  # [B, H_kv, T_q, T_k]

    last_query_slot = offset + torch.clamp((torch.arange(num_q_tiles, device=device) + 1) * tile, max=query_len) - 1
    key_tile_start = torch.arange(num_k_tiles, device=device) * tile
    needed &= key_tile_start[None, :] <= last_query_slot[:, None]

    # The n-th listed tile is the first column where the running count of needed tiles
    # reaches n: a search in each row, no sort and no wait for the host.
    running = needed.cumsum(-1, dtype=torch.int32)  # [B, H_kv, T_q, T_k]
    ranks = torch.arange(1, num_k_tiles + 1, dtype=torch.int32, device=device).expand_as(running).contiguous()
    tile_index = torch.searchsorted(running, ranks, out_int32=True).clamp_(max=num_k_tiles - 1)
    return tile_index, running[..., -1].contiguous()


def runs_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(_region_means_kernel, InterpretedFunction)


def _is_aligned(layout: RegionLayout, offset: int, tile: int) -> bool:
    """True when regions and the query offset fall on tile boundaries (the last region may be ragged)."""
    return offset % tile == 0 and all(bound % tile == 0 for bound in layout.bounds[:-1])


def _pick_tile(layout: RegionLayout, offset: int) -> int:
    for tile in (64, 32, 16):
        if _is_aligned(layout, offset, tile):
            return tile
    return 64


@triton.jit
def _region_means_kernel(
    q_ptr, k_ptr,
    bounds_ptr,  # [R + 1] int64, region r holds key slots bounds[r] .. bounds[r + 1] - 1
    region_query_ptr,  # [B * H_kv, R, HEAD_DIM] float32 out: mean over the group's heads and the region's queries
    region_key_ptr,  # [B * H_kv, R, HEAD_DIM] float32 out: mean over the region's keys
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    num_kv_heads, group, offset,  # offset: key slot of query row 0
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    region = tl.program_id(0)
    batch_kv = tl.program_id(1)
    batch = batch_kv // num_kv_heads
    kv_head = batch_kv % num_kv_heads
    start = tl.load(bounds_ptr + region).to(tl.int32)
    end = tl.load(bounds_ptr + region + 1).to(tl.int32)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    within = tl.arange(0, BLOCK_L)
    out_offset = (batch_kv * tl.num_programs(0) + region) * HEAD_DIM + dims

    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    key_sum = tl.zeros([BLOCK_D], tl.float32)
    for chunk in range(start, end, BLOCK_L):
        slots = chunk + within
        k = tl.load(k_base + slots[:, None] * stride_kn + dims[None, :], mask=(slots < end)[:, None] & dim_ok[None, :], other=0.0)
        key_sum += tl.sum(k.to(tl.float32), 0)
    tl.store(region_key_ptr + out_offset, key_sum / tl.maximum(end - start, 1), mask=dim_ok)

    # Query rows are key slots minus offset; a region before the offset holds none (mean 0).
    row_start = tl.maximum(start, offset) - offset
    row_end = tl.maximum(end, offset) - offset
    query_sum = tl.zeros([BLOCK_D], tl.float32)
    for member in range(0, group):
        q_base = q_ptr + batch * stride_qb + (kv_head * group + member) * stride_qh
        for chunk in range(row_start, row_end, BLOCK_L):
            rows = chunk + within
            q = tl.load(q_base + rows[:, None] * stride_qm + dims[None, :], mask=(rows < row_end)[:, None] & dim_ok[None, :], other=0.0)
            query_sum += tl.sum(q.to(tl.float32), 0)
    tl.store(region_query_ptr + out_offset, query_sum / tl.maximum((row_end - row_start) * group, 1), mask=dim_ok)


_ATTENTION_CONFIGS = [  # HEADS * TILE query rows and STEP * TILE keys at a time
    triton.Config({"HEADS": heads, "STEP": step}, num_warps=warps, num_stages=stages)
    for heads, step, warps, stages in [
        (1, 1, 4, 3), (1, 1, 4, 5), (2, 1, 8, 3), (2, 1, 8, 5), (4, 1, 8, 3),
        (1, 2, 4, 3), (1, 2, 8, 3), (2, 2, 8, 3), (2, 2, 8, 5),
    ]
]


def _prune_attention_configs(configs, named_args, **constants):
    """Configs whose HEADS divide the group; small or float32 problems take one fixed config
    (no benchmarking: tests, the interpreter, short chunks, the float32 checks)."""
    group = named_args["num_q_heads"] // named_args["num_kv_heads"]
    tile = constants["TILE"]
    fits = [c for c in configs if group % c.kwargs["HEADS"] == 0 and c.kwargs["HEADS"] * tile <= 256]
    query = named_args["q_ptr"]
    programs = named_args["num_q_tiles"] * query.shape[0] * named_args["num_q_heads"]
    if query.dtype == torch.float32 or programs < 1024 or not fits:
        return [_fixed_config(group, tile, constants["BLOCK_D"] * query.element_size())]
    return fits


def _fixed_config(group: int, tile: int, row_bytes: int) -> triton.Config:
    """The widest launch whose q block and one K and V block fit 96 KiB of shared memory."""
    for heads, step in [(4, 2), (2, 2), (2, 1), (1, 2), (1, 1)]:
        if group % heads == 0 and heads * tile <= 128 and (heads + 2 * step) * tile * row_bytes <= 96 * 1024:
            break
    return triton.Config({"HEADS": heads, "STEP": step}, num_warps=4 if heads * tile <= 64 else 8, num_stages=2)


@triton.autotune(
    configs=_ATTENTION_CONFIGS,
    key=["num_q_heads", "num_kv_heads", "length_class", "HEAD_DIM", "TILE", "REGION_MASK"],
    prune_configs_by={"early_config_prune": _prune_attention_configs},
)
@triton.jit(do_not_specialize=["length_class"])  # 16 must not compile a variant of its own
def _bra_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    tile_index_ptr,  # [B * H_kv, T_q, list_len] int32
    tile_count_ptr,  # [B * H_kv, T_q] int32
    query_region_ptr,  # [L_q] int32, region of each query slot (REGION_MASK only)
    key_region_ptr,  # [L_k] int32, region of each key slot (REGION_MASK only)
    routed_ptr,  # [B * H_kv, R, R] int8, routed[query region, key region] (REGION_MASK only)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_q_heads, num_kv_heads, query_len, key_len, num_regions, num_q_tiles, list_len,
    scale_log2,  # softmax scale * log2(e)
    length_class,  # autotuning key only
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    REGION_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS: tl.constexpr,  # query heads of one KV group per program, stacked along the rows
    STEP: tl.constexpr,  # whole key tiles per step of the loop
):
    q_tile = num_q_tiles - 1 - tl.program_id(0)  # the longest lists start first
    head_blocks = num_q_heads // HEADS
    batch = tl.program_id(1) // head_blocks
    first_head = (tl.program_id(1) % head_blocks) * HEADS
    kv_head = first_head // (num_q_heads // num_kv_heads)
    routing_row = (batch * num_kv_heads + kv_head) * num_q_tiles + q_tile

    block_rows = tl.arange(0, HEADS * TILE)  # [M]: HEADS heads x TILE query rows
    heads = first_head + block_rows // TILE
    rows = q_tile * TILE + block_rows % TILE  # [M] query rows
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    row_ok = rows < query_len
    dim_ok = dims < HEAD_DIM
    query_slot = rows + (key_len - query_len)  # bottom-right causal alignment
    q_rows = q_ptr + batch * stride_qb + heads * stride_qh + rows * stride_qm  # [M]
    q = _load_rows(q_rows[:, None] + dims[None, :], row_ok, dim_ok, True, HEAD_DIM == BLOCK_D)  # [M, BLOCK_D]
    if REGION_MASK:
        query_region = tl.load(query_region_ptr + rows, mask=row_ok, other=0)  # [M]
        routed_base = routed_ptr + (batch * num_kv_heads + kv_head) * num_regions * num_regions
    else:
        query_region = rows
        routed_base = routed_ptr

    row_max = tl.full([HEADS * TILE], float("-inf"), tl.float32)
    row_sum = tl.zeros([HEADS * TILE], tl.float32)
    acc = tl.zeros([HEADS * TILE, BLOCK_D], tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    list_base = tile_index_ptr + routing_row * list_len

    num_tiles = tl.load(tile_count_ptr + routing_row)
    if REGION_MASK:
        # Every tile masked. Not software-pipelined: the mask needs a tile's key slots after
        # its dots, and Triton 3.6 lets the next tile's pipelined index load overwrite them
        # first (wrong results on an H100).
        for visit in tl.range(0, num_tiles, num_stages=1):
            acc, row_max, row_sum = _attend_tiles(
                acc, row_max, row_sum, q, list_base, visit, k_base, v_base, stride_kn, stride_vn,
                dims, dim_ok, query_slot, query_region, routed_base, key_region_ptr, num_regions, key_len, scale_log2,
                TILE, 1, HEAD_DIM == BLOCK_D, True, REGION_MASK, DOT_PRECISION,
            )
    else:
        # Aligned: every listed tile but the last (the diagonal) lies wholly before the query
        # tile and inside routed regions, so those run unmasked, STEP at a time (one wider
        # block of keys) after a single one when their count is odd; then the diagonal tile,
        # causally masked, outside the pipelined loops (see above).
        num_unmasked = num_tiles - 1
        first_step = 0
        if STEP > 1:
            first_step = num_unmasked % STEP
            for visit in range(0, first_step):
                acc, row_max, row_sum = _attend_tiles(
                    acc, row_max, row_sum, q, list_base, visit, k_base, v_base, stride_kn, stride_vn,
                    dims, dim_ok, query_slot, query_region, routed_base, key_region_ptr, num_regions, key_len,
                    scale_log2, TILE, 1, HEAD_DIM == BLOCK_D, False, REGION_MASK, DOT_PRECISION,
                )
        for visit in range(first_step, num_unmasked, STEP):
            acc, row_max, row_sum = _attend_tiles(
                acc, row_max, row_sum, q, list_base, visit, k_base, v_base, stride_kn, stride_vn,
                dims, dim_ok, query_slot, query_region, routed_base, key_region_ptr, num_regions, key_len,
                scale_log2, TILE, STEP, HEAD_DIM == BLOCK_D, False, REGION_MASK, DOT_PRECISION,
            )
        acc, row_max, row_sum = _attend_tiles(
            acc, row_max, row_sum, q, list_base, num_unmasked, k_base, v_base, stride_kn, stride_vn,
            dims, dim_ok, query_slot, query_region, routed_base, key_region_ptr, num_regions, key_len, scale_log2,
            TILE, 1, HEAD_DIM == BLOCK_D, True, REGION_MASK, DOT_PRECISION,
        )

    # Every real row reads at least its own slot, so row_sum > 0 there; padding rows are not stored.
    acc = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    out_rows = out_ptr + batch * stride_ob + heads * stride_oh + rows * stride_om  # [M]
    tl.store(out_rows[:, None] + dims[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _attend_tiles(
    acc, row_max, row_sum,  # online softmax state: [M, BLOCK_D], [M], [M]
    q, list_base, visit, k_base, v_base, stride_kn, stride_vn,
    dims, dim_ok, query_slot, query_region, routed_base, key_region_ptr, num_regions, key_len, scale_log2,
    TILE: tl.constexpr,
    COUNT: tl.constexpr,  # listed tiles visit .. visit + COUNT - 1, as one block of keys
    EVEN_D: tl.constexpr,
    MASKED: tl.constexpr,  # False: the tiles are whole, before every query row and routed
    REGION_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    within = tl.arange(0, COUNT * TILE)
    cols = tl.load(list_base + visit + within // TILE) * TILE + within % TILE  # [N] key slots
    col_ok = cols < key_len
    k = _load_rows(k_base + cols[:, None] * stride_kn + dims[None, :], col_ok, dim_ok, MASKED, EVEN_D)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
    if MASKED:
        allowed = col_ok[None, :] & (cols[None, :] <= query_slot[:, None])
        if REGION_MASK:
            key_region = tl.load(key_region_ptr + cols, mask=col_ok, other=0)
            pair = tl.load(routed_base + query_region[:, None] * num_regions + key_region[None, :])
            allowed = allowed & (pair != 0)
        scores = tl.where(allowed, scores, float("-inf"))
        # A row with nothing allowed yet keeps max -inf, so shift by 0 instead.
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        shift = new_max
    rescale = tl.exp2(row_max - shift)
    weights = tl.exp2(scores - shift[:, None])  # [M, N]
    row_sum = row_sum * rescale + tl.sum(weights, 1)
    v = _load_rows(v_base + cols[:, None] * stride_vn + dims[None, :], col_ok, dim_ok, MASKED, EVEN_D)
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _load_rows(ptrs, row_ok, dim_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load [N, BLOCK_D], masking only what can be out of range so whole rows stay vectorised."""
    if CHECK_ROWS:
        if EVEN_D:
            block = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            block = tl.load(ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            block = tl.load(ptrs)
        else:
            block = tl.load(ptrs, mask=dim_ok[None, :], other=0.0)
    return block
