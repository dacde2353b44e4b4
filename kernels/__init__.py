"""Attention and selection kernels: a PyTorch reference beside each fast path."""

from kernels.attention import AttentionSpec, AttentionSpecError, attention, causal_mask, use_backend
from kernels.errors import VidsieveError

__all__ = ["AttentionSpec", "AttentionSpecError", "VidsieveError", "attention", "causal_mask", "use_backend"]
