"""Bi-level routing attention: the PyTorch spec, the gathered CPU path and the decode variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.bra import (
    RegionLayout,
    bra_decode,
    bra_gathered,
    bra_reference,
    frame_regions,
    route_regions,
)


def random_qkv(seed: int, *, batch=1, q_heads=4, kv_heads=2, query_len=77, key_len=77, head_dim=16):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_heads, query_len, head_dim, generator=generator)
    key = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator)
    return query, key, value


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def dense_causal(query, key, value, scale):
    """Dense SDPA with the bottom-right causal mask, KV heads repeated for GQA."""
    group = query.shape[1] // key.shape[1]
    query_len, key_len = query.shape[2], key.shape[2]
    mask = (torch.arange(key_len)[None, :] <= torch.arange(query_len)[:, None] + key_len - query_len).to(query.device)
    return F.scaled_dot_product_attention(
        query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=mask, scale=scale
    )


def brute_force_bra(query, key, value, scale, topk, bounds, forced):
    """BRA written as plain loops from the method's description, independent of kernels.bra."""
    batch, q_heads, query_len, _ = query.shape
    kv_heads, key_len = key.shape[1], key.shape[2]
    group, offset, num_regions = q_heads // kv_heads, key_len - query_len, len(bounds) - 1
    out = torch.zeros_like(query)
    for b in range(batch):
        for g in range(kv_heads):
            heads = range(g * group, (g + 1) * group)
            region_keys = [key[b, g, bounds[c] : bounds[c + 1]].mean(0) for c in range(num_regions)]
            for r in range(num_regions):
                slots = [s for s in range(bounds[r], bounds[r + 1]) if s >= offset]
                if not slots:
                    continue
                rows = [s - offset for s in slots]
                region_query = query[b, list(heads)][:, rows].mean((0, 1))
                candidates = [c for c in range(r) if not forced[c]]
                ranked = sorted(candidates, key=lambda c: (-float(region_query @ region_keys[c]), c))
                chosen = {r} | {c for c in range(r) if forced[c]} | set(ranked[:topk])
                readable = [j for c in sorted(chosen) for j in range(bounds[c], bounds[c + 1])]
                for h in heads:
                    for s in slots:
                        keys = [j for j in readable if j <= s]
                        weights = torch.softmax(key[b, g, keys] @ query[b, h, s - offset] * scale, 0)
                        out[b, h, s - offset] = weights @ value[b, g, keys]
    return out


LAYOUTS = {
    "blocks_of_8": lambda length: RegionLayout.blocks(length, 8),
    "frames_of_any_size": lambda length: RegionLayout.from_region_ids(
        torch.tensor([0] * 5 + [1] * 13 + [2] * 2 + [3] * 20 + [4] * 9 + [5] * (length - 49))
    ),
}


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("query_len", [77, 20, 1])
def test_reference_with_topk_covering_every_region_equals_dense_causal_sdpa(layout_name, query_len):
    query, key, value = random_qkv(1, query_len=query_len)
    layout = LAYOUTS[layout_name](77)
    out = bra_reference(query, key, value, scale=0.25, topk=layout.num_regions, layout=layout)
    torch.testing.assert_close(out, dense_causal(query, key, value, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("query_len", [77, 30])
def test_reference_matches_brute_force_routing_with_gqa_and_forced_regions(layout_name, query_len):
    query, key, value = random_qkv(2, query_len=query_len)
    layout = LAYOUTS[layout_name](77)
    forced = layout.first_regions(1)
    forced[3] = True  # e.g. a text region in the middle
    out = bra_reference(query, key, value, scale=0.25, topk=2, layout=layout, forced_regions=forced)
    expected = brute_force_bra(query, key, value, 0.25, 2, layout.bounds, forced.tolist())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_routing_reads_own_and_forced_regions_topk_others_and_never_a_later_one():
    query, key, _ = random_qkv(3, batch=2)
    layout = RegionLayout.blocks(77, 8)  # 10 regions, the last one 5 slots
    forced = torch.zeros(10, dtype=torch.bool)
    forced[[0, 4]] = True
    routed = route_regions(query, key, layout, topk=3, forced_regions=forced)  # [2, 2, 10, 10]
    region = torch.arange(10)
    assert routed[..., region, region].all()
    assert not routed[..., region[None, :] > region[:, None]].any()
    for r in range(10):
        earlier_forced = [c for c in (0, 4) if c < r]
        assert routed[..., r, earlier_forced].all()
        candidates = r - len(earlier_forced)
        extra = routed[..., r, :r].sum(-1) - len(earlier_forced)
        assert (extra == min(3, candidates)).all()


def test_routing_ties_go_to_the_earlier_region():
    # Equal region keys, and small integers so every affinity is exact whatever the summation
    # order: all candidates tie bit for bit.
    query = torch.randint(-3, 4, (1, 4, 72, 16), generator=torch.Generator().manual_seed(4)).float()
    key = torch.ones(1, 2, 72, 16)
    routed = route_regions(query, key, RegionLayout.blocks(72, 8), topk=2)
    assert routed[0, :, 8].nonzero()[:, 1].tolist() == [0, 1, 8, 0, 1, 8]


@pytest.mark.parametrize("implementation", [bra_reference, bra_gathered])
def test_future_keys_and_values_do_not_change_earlier_outputs(implementation):
    query, key, value = random_qkv(5)
    layout = RegionLayout.blocks(77, 8)
    before = implementation(query, key, value, scale=0.25, topk=2, layout=layout)
    last_seen = 44  # mid-region: its region-mates after it are the future too
    key[:, :, last_seen + 1 :] += 10 * torch.randn_like(key[:, :, last_seen + 1 :])
    value[:, :, last_seen + 1 :] += 10 * torch.randn_like(value[:, :, last_seen + 1 :])
    after = implementation(query, key, value, scale=0.25, topk=2, layout=layout)
    assert torch.equal(after[:, :, : last_seen + 1], before[:, :, : last_seen + 1])
    assert not torch.allclose(after[:, :, last_seen + 1 :], before[:, :, last_seen + 1 :])


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("query_len", [77, 33])
@pytest.mark.parametrize("max_gathered", [1 << 20, 1])  # all query regions in one step; one per step
def test_gathered_matches_reference(layout_name, query_len, max_gathered):
    query, key, value = random_qkv(6, batch=2, query_len=query_len)
    layout = LAYOUTS[layout_name](77)
    forced = layout.first_regions(1)
    expected = bra_reference(query, key, value, scale=0.25, topk=2, layout=layout, forced_regions=forced)
    out = bra_gathered(
        query, key, value, scale=0.25, topk=2, layout=layout, forced_regions=forced, max_gathered=max_gathered
    )
    assert relative_error(out, expected) <= 1e-5


def test_decode_reads_top_blocks_by_query_key_mean_plus_newest_block_and_sinks():
    # 5 blocks of 8 slots; the query points along dim 0, block 2's keys point there most.
    key = torch.zeros(1, 1, 40, 4)
    key[0, 0, :, 1] = 1.0
    key[0, 0, 16:24, 0] = 3.0  # block 2: highest q . mean(K)
    key[0, 0, 8:16, 0] = 2.0  # block 1: second highest
    value = torch.randn(1, 1, 40, 4, generator=torch.Generator().manual_seed(7))
    query = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    layout = RegionLayout.blocks(40, 8)
    routed = route_regions(query, key, layout, topk=1, forced_regions=layout.first_regions(1))
    assert routed[0, 0, 4].nonzero().flatten().tolist() == [0, 2, 4]  # sink, top-1, newest

    out = bra_decode(query, key, value, scale=0.5, topk=1, layout=layout, forced_regions=layout.first_regions(1))
    slots = [*range(0, 8), *range(16, 24), *range(32, 40)]
    weights = torch.softmax(key[0, 0, slots] @ query[0, 0, 0] * 0.5, 0)
    torch.testing.assert_close(out[0, 0, 0], weights @ value[0, 0, slots])


def test_decode_with_topk_covering_every_block_equals_dense():
    query, key, value = random_qkv(8, query_len=1, key_len=93)
    out = bra_decode(query, key, value, scale=0.25, topk=12, layout=RegionLayout.blocks(93, 8))
    torch.testing.assert_close(out, dense_causal(query, key, value, 0.25), atol=1e-5, rtol=1e-5)


def test_frame_regions_start_a_region_at_every_frame_or_text_change():
    frame_index = torch.tensor([-1, -1, 0, 0, 0, 1, 1, -1, 2, 2])
    assert frame_regions(frame_index).tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 4, 4]
    layout = RegionLayout.from_region_ids(frame_regions(frame_index))
    assert layout.bounds == (0, 2, 5, 7, 8, 10)
    assert layout.regions_holding(frame_index == -1).tolist() == [True, False, False, True, False]


def test_region_ids_must_be_non_decreasing():
    with pytest.raises(ValueError, match="non-decreasing"):
        RegionLayout.from_region_ids(torch.tensor([0, 1, 0]))
