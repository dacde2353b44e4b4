"""Device and dtype are choices: CUDA when available else CPU; bf16 on CUDA, fp32 on CPU."""

from __future__ import annotations

import torch

from kernels.errors import VidsieveError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when available, else CPU; anything else must exist here."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise VidsieveError(f"unknown device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VidsieveError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`None`/"auto" gives bf16 on CUDA and fp32 elsewhere."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise VidsieveError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]
