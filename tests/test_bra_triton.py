"""The Triton BRA kernel against the PyTorch spec, under TRITON_INTERPRET=1 on CPU (on CUDA if present).

The interpreter is chosen when `@triton.jit` decorates the kernel, so the variable is set
here, before `kernels.bra_triton` is first imported (nothing else imports it at collection).
The interpreter is slow: shapes stay small, tiles are 16 wide.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from kernels import AttentionSpec, attention, use_backend  # noqa: E402
from kernels.bra import RegionLayout, bra_reference, route_regions  # noqa: E402
from kernels.bra import bra_gathered  # noqa: E402
from kernels.bra_triton import (  # noqa: E402
    _ATTENTION_CONFIGS,
    _bra_forward_kernel,
    bra_triton,
    route_regions_triton,
    runs_interpreted,
    tile_lists,
)
from tests.test_bra import LAYOUTS, dense_causal, random_qkv, relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and not runs_interpreted():
    pytest.skip("kernels.bra_triton was imported before TRITON_INTERPRET was set", allow_module_level=True)


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def layout_on_device(layout: RegionLayout) -> RegionLayout:
    return RegionLayout(layout.bounds, layout.region_of_slot.to(DEVICE))


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 2), (2, 2), (4, 1)])  # 2, 1 and 4 query heads per program
def test_triton_matches_reference_on_blocks_with_a_ragged_last_block_and_gqa(q_heads, kv_heads):
    # 83 slots in blocks of 16: the last block holds 3; head dim 24 is not a power of two.
    query, key, value = on_device(
        *random_qkv(20, batch=2, q_heads=q_heads, kv_heads=kv_heads, query_len=83, key_len=83, head_dim=24)
    )
    layout = layout_on_device(RegionLayout.blocks(83, 16))
    forced = layout.first_regions(1)
    expected = bra_reference(query, key, value, scale=0.2, topk=2, layout=layout, forced_regions=forced)
    out = bra_triton(query, key, value, scale=0.2, topk=2, layout=layout, forced_regions=forced, tile=16)
    assert relative_error(out, expected) <= 1e-4


def test_triton_matches_reference_on_frames_of_any_size_through_the_region_lookup():
    query, key, value = on_device(*random_qkv(21))
    layout = layout_on_device(LAYOUTS["frames_of_any_size"](77))
    forced = layout.first_regions(1)
    forced[3] = True
    expected = bra_reference(query, key, value, scale=0.25, topk=1, layout=layout, forced_regions=forced)
    out = bra_triton(query, key, value, scale=0.25, topk=1, layout=layout, forced_regions=forced, tile=16)
    assert relative_error(out, expected) <= 1e-4


@pytest.mark.parametrize("query_len", [29, 33])  # offset 48 keeps tiles aligned, 44 needs the region lookup
def test_triton_matches_reference_for_a_chunk_after_a_cache(query_len):
    query, key, value = on_device(*random_qkv(22, query_len=query_len, key_len=77))
    layout = layout_on_device(RegionLayout.blocks(77, 16))
    expected = bra_reference(query, key, value, scale=0.25, topk=2, layout=layout)
    out = bra_triton(query, key, value, scale=0.25, topk=2, layout=layout, tile=16)
    assert relative_error(out, expected) <= 1e-4


def test_triton_reads_strided_views_of_a_kv_cache_and_of_transposed_queries():
    query, key, value = random_qkv(28, query_len=45, key_len=45)
    cache = torch.zeros(2, 2, 64, 16)  # [K/V, H_kv, capacity, D], as KVState stores them
    cache[0, :, :45], cache[1, :, :45] = key[0], value[0]
    key_view, value_view = cache[0, :, :45].unsqueeze(0), cache[1, :, :45].unsqueeze(0)
    query_view = query.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, L, D] over [B, L, H, D] memory
    assert not key_view.is_contiguous() and not query_view.is_contiguous()
    layout = RegionLayout.blocks(45, 16)
    expected = bra_reference(query, key, value, scale=0.25, topk=1, layout=layout)
    query_view, key_view, value_view = on_device(query_view, key_view, value_view)
    out = bra_triton(query_view, key_view, value_view, scale=0.25, topk=1, layout=layout_on_device(layout), tile=16)
    assert relative_error(out.cpu(), expected) <= 1e-4


def test_triton_in_float16_stays_close_to_the_float32_reference():
    query, key, value = random_qkv(23, query_len=70, key_len=70)
    layout = RegionLayout.blocks(70, 16)
    expected = bra_reference(query, key, value, scale=0.25, topk=2, layout=layout)
    half = on_device(*(t.half() for t in (query, key, value)))
    out = bra_triton(*half, scale=0.25, topk=2, layout=layout_on_device(layout), tile=16)
    assert out.dtype == torch.float16
    assert relative_error(out.float().cpu(), expected) <= 5e-3


def test_triton_with_topk_covering_every_region_equals_dense_causal_sdpa():
    query, key, value = on_device(*random_qkv(24, query_len=61, key_len=61))
    layout = layout_on_device(RegionLayout.blocks(61, 16))
    out = bra_triton(query, key, value, scale=0.25, topk=4, layout=layout, tile=16)
    assert relative_error(out, dense_causal(query, key, value, 0.25)) <= 1e-4


@pytest.mark.parametrize("query_len", [77, 33])  # a prefill; a chunk after a cache (regions without queries)
def test_triton_routing_equals_the_reference_routing_on_frames_with_gqa_and_forced_regions(query_len):
    query, key, _ = on_device(*random_qkv(29, batch=2, query_len=query_len, key_len=77))
    layout = layout_on_device(LAYOUTS["frames_of_any_size"](77))
    forced = layout.first_regions(1)
    forced[3] = True
    expected = route_regions(query, key, layout, topk=2, forced_regions=forced)
    assert torch.equal(route_regions_triton(query, key, layout, topk=2, forced_regions=forced), expected)


def test_triton_routing_breaks_exact_ties_towards_the_earlier_region_like_the_reference():
    query, key, _ = random_qkv(30, query_len=72, key_len=72)
    query[:, :, 64:] = 0.0  # the last region's mean query is 0: all its candidates score exactly 0
    layout = RegionLayout.blocks(72, 8)
    forced = layout.first_regions(1)
    expected = route_regions(query, key, layout, topk=2, forced_regions=forced)
    query, key = on_device(query, key)
    routed = route_regions_triton(query, key, layout_on_device(layout), topk=2, forced_regions=forced.to(DEVICE))
    assert torch.equal(routed.cpu(), expected)
    assert routed[0, :, 8].nonzero()[:, 1].tolist() == [0, 1, 2, 8, 0, 1, 2, 8]  # sink, regions 1 and 2, own


def test_tile_lists_hold_each_tiles_routed_blocks_in_order_and_nothing_later():
    query, key, _ = random_qkv(25, query_len=77, key_len=77)
    layout = RegionLayout.blocks(77, 16)  # aligned: a tile is a region
    routed = route_regions(query, key, layout, topk=1, forced_regions=layout.first_regions(1))
    tile_index, tile_count = tile_lists(routed, layout, 77, 16)
    for q_tile in range(5):
        listed = tile_index[0, 0, q_tile, : tile_count[0, 0, q_tile]].tolist()
        assert listed == routed[0, 0, q_tile].nonzero().flatten().tolist()
        assert listed == sorted(listed) and listed[-1] == q_tile


def test_attention_dispatch_runs_the_triton_backend_when_asked():
    query, key, value = on_device(*random_qkv(26, query_len=50, key_len=50))
    spec = AttentionSpec.parse("bra:topk=1,block=16")
    with use_backend("reference"):
        expected = attention(query, key, value, scale=0.25, spec=spec)
    with use_backend("triton"):
        out = attention(query, key, value, scale=0.25, spec=spec)
    assert relative_error(out, expected) <= 1e-4


@pytest.mark.parametrize("block", [64, 48])  # with 32-wide tiles: 64 is aligned, 48 needs the region lookup
def test_triton_matches_reference_at_a_few_hundred_tokens(block):
    query, key, value = on_device(*random_qkv(27, q_heads=4, kv_heads=1, query_len=301, key_len=301, head_dim=64))
    layout = layout_on_device(RegionLayout.blocks(301, block))
    forced = layout.first_regions(1)
    expected = bra_reference(query, key, value, scale=0.125, topk=2, layout=layout, forced_regions=forced)
    out = bra_triton(query, key, value, scale=0.125, topk=2, layout=layout, forced_regions=forced, tile=32)
    assert relative_error(out, expected) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="autotuned launches run on CUDA only (the interpreter takes one fixed config)")
@pytest.mark.parametrize("config", _ATTENTION_CONFIGS, ids=str)
def test_every_autotuned_launch_matches_the_gathered_path_at_4k_tokens_in_bfloat16(config, monkeypatch):
    # 64-token tiles, head dim 128 and enough programs to autotune: the benchmark's case.
    query, key, value = random_qkv(31, q_heads=16, kv_heads=4, query_len=4096, key_len=4096, head_dim=128)
    layout = layout_on_device(RegionLayout.blocks(4096, 64))
    bra = dict(scale=128**-0.5, topk=8, layout=layout, forced_regions=layout.first_regions(1))
    query, key, value = (t.to(DEVICE, torch.bfloat16) for t in (query, key, value))
    expected = bra_gathered(query.float(), key.float(), value.float(), **bra)
    monkeypatch.setattr(_bra_forward_kernel, "configs", [config])
    monkeypatch.setattr(_bra_forward_kernel, "cache", {})
    out = bra_triton(query, key, value, **bra)
    assert _bra_forward_kernel.best_config is config
    assert relative_error(out.float(), expected) <= 2e-2
