"""The one dispatch point for attention in the LM runner.

Every attention call of `vlm.LMRunner` goes through `attention(...)`. An `AttentionSpec`
chooses the method, parsed from the string every front door takes (`--attention ...`):

    dense                                    dense causal SDPA (the default)
    bra:topk=8,block=64,sinks=1              bi-level routing attention over 64-token blocks
    bra:topk=4,regions=frames                ... over one region per frame (caller passes region_ids)

Bi-level routing attention (see `kernels.bra`) runs on one of three backends: `triton` (the
block-sparse kernel, chosen on CUDA when triton is installed), `gathered` (PyTorch that skips
unrouted regions, chosen elsewhere) and `reference` (the dense-mask spec). `use_backend(...)`
overrides the choice, for tests and benchmarks. A single decode query (L_q == 1) always uses
`bra_decode`.

Causality is by slot order: the `L_q` queries are the LAST `L_q` slots of the `L_k` keys, so
query i may see key slots `[0, L_k - L_q + i]` (a bottom-right aligned causal mask). Slots
keep temporal order even after eviction, so this stays right for a pruned or compacted cache.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.bra import RegionLayout, bra_decode, bra_gathered, bra_reference
from kernels.errors import VidsieveError
from kernels.masks import causal_mask

__all__ = ["AttentionSpec", "AttentionSpecError", "BACKENDS", "attention", "causal_mask", "use_backend"]

BACKENDS = ("reference", "gathered", "triton")
_KINDS = ("dense", "bra")
_REGION_KINDS = ("blocks", "frames")


class AttentionSpecError(VidsieveError):
    """An attention spec string with an unknown method, an unknown key or a bad value."""


@dataclass(frozen=True)
class AttentionSpec:
    """Which attention the LM runs. Parse the user's string with `AttentionSpec.parse`."""

    kind: str = "dense"  # "dense" or "bra"
    topk: int = 8  # bra: routed regions per query region, on top of its own and the forced ones
    block: int = 64  # bra: tokens per region when regions == "blocks"
    sinks: int = 1  # bra: leading regions every query reads (attention sinks)
    regions: str = "blocks"  # bra: "blocks" (fixed size) or "frames" (caller passes region_ids)

    @classmethod
    def parse(cls, text: str) -> AttentionSpec:
        """`dense` or `bra[:key=value,...]` (keys topk, block, sinks, regions; case-insensitive)."""
        name, _, options = text.strip().partition(":")
        kind = name.strip().lower()
        if kind not in _KINDS:
            raise AttentionSpecError(f"unknown attention {name.strip()!r} in {text!r}; valid: {', '.join(_KINDS)}")
        valid_keys = () if kind == "dense" else ("topk", "block", "sinks", "regions")
        values: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in options.split(","))):
            key, equals, value = (piece.strip() for piece in item.partition("="))
            key = key.lower()
            if not equals:
                raise AttentionSpecError(f"expected key=value in attention spec {text!r}, got {item!r}")
            if key not in valid_keys:
                valid = ", ".join(valid_keys) or "none"
                raise AttentionSpecError(f"unknown key {key!r} for {kind} attention in {text!r}; valid keys: {valid}")
            if key in values:
                raise AttentionSpecError(f"key {key!r} given twice in attention spec {text!r}")
            values[key] = value
        if kind == "dense":
            return cls()
        spec = cls(
            kind="bra",
            topk=_count(values, "topk", cls.topk, minimum=1, text=text),
            block=_count(values, "block", cls.block, minimum=1, text=text),
            sinks=_count(values, "sinks", cls.sinks, minimum=0, text=text),
            regions=values.get("regions", cls.regions).lower(),
        )
        if spec.regions not in _REGION_KINDS:
            raise AttentionSpecError(
                f"bad value {values['regions']!r} for regions in {text!r}; valid: {', '.join(_REGION_KINDS)}"
            )
        return spec

    def __str__(self) -> str:
        if self.kind == "dense":
            return "dense"
        return f"bra:topk={self.topk},block={self.block},sinks={self.sinks},regions={self.regions}"


def _count(values: dict[str, str], key: str, default: int, *, minimum: int, text: str) -> int:
    raw = values.get(key)
    if raw is None:
        return default
    if not re.fullmatch(r"\d+", raw) or int(raw) < minimum:
        raise AttentionSpecError(f"bad value {raw!r} for {key} in {text!r}; expected an integer >= {minimum}")
    return int(raw)


_backend_override: ContextVar[str | None] = ContextVar("vidsieve_attention_backend", default=None)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run bi-level routing attention on backend `name` (one of BACKENDS) inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    token = _backend_override.set(name)
    try:
        yield
    finally:
        _backend_override.reset(token)


def backend_for(device: torch.device) -> str:
    """The backend bi-level routing attention uses on `device`: the override, else triton on
    CUDA when triton is installed, else the PyTorch `gathered` path."""
    override = _backend_override.get()
    if override is not None:
        return override
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "gathered"


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    spec: AttentionSpec | None = None,
    region_ids: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over the cache (which already holds their own keys).

    query: [B, H_q, L_q, D]; key, value: [B, H_kv, L_k, D] with H_q a multiple of H_kv
    (grouped-query attention). Returns [B, H_q, L_q, D].
    spec: dense when None. For bi-level routing attention, per call:
      region_ids [L_k] int, non-decreasing: required with regions=frames, refused with blocks
        (build it from the slots' frame index with `kernels.bra.frame_regions`);
      forced [L_k] bool: slots whose regions every later query reads (e.g. text), optional.
    Dense attention ignores region_ids and forced.
    """
    if spec is None or spec.kind == "dense":
        return _dense(query, key, value, scale=scale)
    layout = _layout(spec, key.shape[2], key.device, region_ids)
    forced_regions = layout.first_regions(spec.sinks)
    if forced is not None:
        forced_regions |= layout.regions_holding(forced)
    if query.shape[2] == 1:
        return bra_decode(query, key, value, scale=scale, topk=spec.topk, layout=layout, forced_regions=forced_regions)
    return _bra_backend(backend_for(query.device))(
        query, key, value, scale=scale, topk=spec.topk, layout=layout, forced_regions=forced_regions
    )


def _layout(spec: AttentionSpec, key_len: int, device: torch.device, region_ids: torch.Tensor | None) -> RegionLayout:
    if spec.regions == "frames":
        if region_ids is None:
            raise ValueError("bra with regions=frames needs region_ids [L_k] (see kernels.bra.frame_regions)")
        if region_ids.shape != (key_len,):
            raise ValueError(f"region_ids must have shape ({key_len},), got {tuple(region_ids.shape)}")
        return RegionLayout.from_region_ids(region_ids.to(device))
    if region_ids is not None:
        raise ValueError("region_ids are only used with regions=frames; blocks come from the spec's block size")
    return RegionLayout.blocks(key_len, spec.block, device)


def _bra_backend(name: str):
    if name == "reference":
        return bra_reference
    if name == "gathered":
        return bra_gathered
    try:
        from kernels.bra_triton import bra_triton
    except ImportError as error:
        raise ImportError(
            "the triton attention backend needs the triton extra: pip install vidsieve[triton]"
        ) from error
    return bra_triton


def _dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float) -> torch.Tensor:
    query_len, key_len = query.shape[-2], key.shape[-2]
    if query_len == key_len:
        # Plain causal prefill; SDPA's own causal path (top-left aligned) is right here.
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=_is_grouped(query, key)
        )
    if query_len == 1:
        # One decode step sees every slot: no mask at all.
        return F.scaled_dot_product_attention(
            query, key, value, scale=scale, enable_gqa=_is_grouped(query, key)
        )
    # A chunk appended after existing slots needs the bottom-right aligned mask; masked SDPA
    # does not take grouped heads on every backend, so repeat the KV heads explicitly.
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    mask = causal_mask(query_len, key_len, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def _is_grouped(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.shape[1] != key.shape[1]
