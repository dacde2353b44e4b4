"""kernels.attention: the spec strings, the dispatch between dense and BRA, backend choice."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import AttentionSpec, AttentionSpecError, VidsieveError, attention, use_backend
from kernels.attention import backend_for
from kernels.bra import RegionLayout, bra_decode, bra_reference, frame_regions
from tests.test_bra import dense_causal, random_qkv


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dense", AttentionSpec()),
        ("dense:", AttentionSpec()),
        ("bra", AttentionSpec(kind="bra")),
        ("bra:topk=8,block=64", AttentionSpec(kind="bra", topk=8, block=64)),
        (" BRA : TopK = 2 , sinks=0, regions=Frames ", AttentionSpec(kind="bra", topk=2, sinks=0, regions="frames")),
    ],
)
def test_spec_strings_parse_case_and_space_insensitively(text, expected):
    assert AttentionSpec.parse(text) == expected


def test_spec_prints_as_a_canonical_string_that_parses_back():
    spec = AttentionSpec.parse("bra:sinks=2,topk=3")
    assert str(spec) == "bra:topk=3,block=64,sinks=2,regions=blocks"
    assert AttentionSpec.parse(str(spec)) == spec
    assert str(AttentionSpec()) == "dense"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("flash", ["'flash'", "dense, bra"]),
        ("bra:top=3", ["'top'", "topk, block, sinks, regions"]),
        ("dense:topk=3", ["'topk'", "valid keys: none"]),
        ("bra:topk=x", ["'x'", "topk", "integer >= 1"]),
        ("bra:topk=0", ["'0'", "topk"]),
        ("bra:block=-4", ["'-4'", "block"]),
        ("bra:sinks=1.5", ["'1.5'", "sinks", "integer >= 0"]),
        ("bra:regions=pixels", ["'pixels'", "blocks, frames"]),
        ("bra:topk", ["key=value", "'topk'"]),
        ("bra:topk=1,topk=2", ["'topk'", "twice"]),
    ],
)
def test_bad_spec_strings_raise_a_user_error_naming_the_problem_and_the_valid_choices(text, named):
    with pytest.raises(AttentionSpecError) as raised:
        AttentionSpec.parse(text)
    assert isinstance(raised.value, VidsieveError)
    for fragment in named:
        assert fragment in str(raised.value)


@pytest.mark.parametrize("query_len", [77, 20, 1])
def test_dense_stays_the_default_and_is_causal_sdpa(query_len):
    query, key, value = random_qkv(10, query_len=query_len)
    expected = dense_causal(query, key, value, 0.25)
    torch.testing.assert_close(attention(query, key, value, scale=0.25), expected, atol=1e-5, rtol=1e-5)
    dense = attention(query, key, value, scale=0.25, spec=AttentionSpec.parse("dense"))
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "gathered"])
@pytest.mark.parametrize("query_len", [77, 20, 1])
def test_bra_with_topk_covering_every_region_equals_dense_for_prefill_chunk_and_decode(backend, query_len):
    query, key, value = random_qkv(11, query_len=query_len)
    spec = AttentionSpec.parse("bra:topk=10,block=8")
    with use_backend(backend):
        out = attention(query, key, value, scale=0.25, spec=spec)
    torch.testing.assert_close(out, dense_causal(query, key, value, 0.25), atol=1e-5, rtol=1e-5)


def test_bra_dispatch_applies_block_size_sinks_and_forced_slots():
    query, key, value = random_qkv(12)
    forced = torch.zeros(77, dtype=torch.bool)
    forced[30] = True  # one text slot forces its whole block (region 3)
    layout = RegionLayout.blocks(77, 8)
    forced_regions = layout.first_regions(2)
    forced_regions[3] = True
    expected = bra_reference(query, key, value, scale=0.25, topk=1, layout=layout, forced_regions=forced_regions)
    spec = AttentionSpec.parse("bra:topk=1,block=8,sinks=2")
    for backend in ("reference", "gathered"):
        with use_backend(backend):
            out = attention(query, key, value, scale=0.25, spec=spec, forced=forced)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bra_with_frame_regions_uses_the_given_region_ids():
    query, key, value = random_qkv(13)
    frame_index = torch.tensor([-1] * 7 + [0] * 20 + [1] * 20 + [-1] * 3 + [2] * 27)
    region_ids = frame_regions(frame_index)
    layout = RegionLayout.from_region_ids(region_ids)
    forced_regions = layout.first_regions(1) | layout.regions_holding(frame_index == -1)
    expected = bra_reference(query, key, value, scale=0.25, topk=1, layout=layout, forced_regions=forced_regions)
    spec = AttentionSpec.parse("bra:topk=1,regions=frames")
    out = attention(query, key, value, scale=0.25, spec=spec, region_ids=region_ids, forced=frame_index == -1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_single_query_goes_through_bra_decode():
    query, key, value = random_qkv(14, query_len=1, key_len=90)
    out = attention(query, key, value, scale=0.25, spec=AttentionSpec.parse("bra:topk=2,block=16"))
    layout = RegionLayout.blocks(90, 16)
    expected = bra_decode(query, key, value, scale=0.25, topk=2, layout=layout, forced_regions=layout.first_regions(1))
    assert torch.equal(out, expected)
    assert not torch.allclose(out, dense_causal(query, key, value, 0.25))


def test_region_ids_must_match_the_region_kind_of_the_spec():
    query, key, value = random_qkv(15)
    with pytest.raises(ValueError, match="needs region_ids"):
        attention(query, key, value, scale=0.25, spec=AttentionSpec.parse("bra:regions=frames"))
    with pytest.raises(ValueError, match="only used with regions=frames"):
        attention(query, key, value, scale=0.25, spec=AttentionSpec.parse("bra"), region_ids=torch.zeros(77))


def test_backend_is_gathered_on_cpu_and_the_override_is_scoped():
    cpu = torch.device("cpu")
    assert backend_for(cpu) == "gathered"
    with use_backend("reference"):
        assert backend_for(cpu) == "reference"
        with use_backend("triton"):
            assert backend_for(cpu) == "triton"
        assert backend_for(cpu) == "reference"
    assert backend_for(cpu) == "gathered"
    with pytest.raises(ValueError, match="reference, gathered, triton"):
        with use_backend("cuda"):
            pass


def test_dense_attention_of_a_kv_cache_view_matches_sdpa():
    """The runner passes strided views of a preallocated cache; dense must take them as before."""
    cache = torch.randn(2, 128, 16)  # [H_kv, capacity, D]
    key = cache[:, :50].unsqueeze(0)
    value = torch.randn(1, 2, 50, 16)
    query = torch.randn(1, 4, 50, 16)
    expected = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), is_causal=True, scale=0.25
    )
    torch.testing.assert_close(attention(query, key, value, scale=0.25), expected)


def test_the_triton_backend_without_triton_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels.bra_triton", None)  # import of it now fails
    query, key, value = random_qkv(16)
    with use_backend("triton"), pytest.raises(ImportError, match=r"pip install vidsieve\[triton\]"):
        attention(query, key, value, scale=0.25, spec=AttentionSpec.parse("bra"))
