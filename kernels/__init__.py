"""Attention and selection kernels: a PyTorch reference beside each fast path."""

from kernels.attention import attention, causal_mask
from kernels.errors import VidsieveError

__all__ = ["VidsieveError", "attention", "causal_mask"]
