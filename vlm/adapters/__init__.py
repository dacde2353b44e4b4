"""Adapters: Hugging Face video-language checkpoints run through vidsieve's pipeline.

One file per family, registered by the `model_type` in the checkpoint's config.json;
`VLM.from_pretrained` picks the adapter. Each loads with its family's own `from_pretrained`
and processor and presents the interface of a native `VLM` (see `base.py`).
"""

from vlm.adapters import llava_onevision, qwen2_vl, smolvlm  # noqa: F401  (register the families)
from vlm.adapters.base import ADAPTERS, HFVideoLM, MediaTokens, register_adapter
from vlm.model import NATIVE_MODEL_TYPE, UnknownModelError


def supported_families() -> str:
    """Every model type vidsieve loads, grouped by family, for error messages and docs."""
    families: dict[str, list[str]] = {}
    for model_type, adapter in ADAPTERS.items():
        families.setdefault(adapter.family, []).append(repr(model_type))
    listed = [f"{NATIVE_MODEL_TYPE!r} (vidsieve-native)"]
    listed += [f"{', '.join(types)} ({family})" for family, types in families.items()]
    return ", ".join(listed)


def load_adapter(model_type: str | None, source, *, device: str | None = None, dtype: str | None = None,
                 attention=None) -> HFVideoLM:
    """The checkpoint at `source` (folder or hub id) through the adapter of its model type."""
    if model_type not in ADAPTERS:
        raise UnknownModelError(f"model {str(source)!r} has model_type {model_type!r}, which vidsieve cannot run; "
                                f"supported model types: {supported_families()}")
    return ADAPTERS[model_type].from_pretrained(source, device=device, dtype=dtype, attention=attention)


__all__ = ["ADAPTERS", "HFVideoLM", "MediaTokens", "load_adapter", "register_adapter", "supported_families"]
