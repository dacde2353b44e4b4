"""The one dispatch point for attention in the LM runner.

Every attention call of `vlm.LMRunner` goes through `attention(...)`. Today there is one
backend, dense `scaled_dot_product_attention`; sparse backends plug in here and nowhere else.

Causality is by slot order: the `L_q` queries are the LAST `L_q` slots of the `L_k` keys, so
query i may see key slots `[0, L_k - L_q + i]` (a bottom-right aligned causal mask). Slots
keep temporal order even after eviction, so this stays right for a pruned or compacted cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [L_q, L_k], True where query i may attend key j (bottom-right aligned)."""
    offset = key_len - query_len
    query_slot = torch.arange(query_len, device=device)[:, None] + offset
    key_slot = torch.arange(key_len, device=device)[None, :]
    return key_slot <= query_slot


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """Causal attention of new queries over the cache (which already holds their own keys).

    query: [B, H_q, L_q, D]; key, value: [B, H_kv, L_k, D] with H_q a multiple of H_kv
    (grouped-query attention). Returns [B, H_q, L_q, D].
    """
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
