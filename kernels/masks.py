"""Boolean attention masks shared by the dense and the sparse paths.

Causality is by slot order: the `L_q` queries are the LAST `L_q` slots of the `L_k` keys, so
query i may see key slots `[0, L_k - L_q + i]` (a bottom-right aligned causal mask).
"""

from __future__ import annotations

import torch


def causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [L_q, L_k], True where query i may attend key j (bottom-right aligned)."""
    offset = key_len - query_len
    query_slot = torch.arange(query_len, device=device)[:, None] + offset
    key_slot = torch.arange(key_len, device=device)[None, :]
    return key_slot <= query_slot
