"""Which ENAT-style reuse a run uses, chosen by a spec string on every front door.

    none                               recompute everything (the default)
    kv                                 prefill a video's KV once; every question reuses it
    patches:threshold=0.02,refresh=8   re-encode only changed patches, full frame every 8
    kv+patches:threshold=0.02          both
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels.errors import VidsieveError


class ReuseSpecError(VidsieveError):
    """A reuse spec with an unknown part, key or value."""


@dataclass(frozen=True)
class ReuseSpec:
    kv: bool = False
    patches: bool = False
    threshold: float = 0.02  # patches: mean absolute pixel change (0..1) that marks a patch changed
    refresh_every: int = 8  # patches: recompute a whole frame this often

    @classmethod
    def parse(cls, text: str) -> "ReuseSpec":
        fields: dict = {}
        for part in filter(None, (p.strip().lower() for p in text.split("+"))):
            name, _, options = part.partition(":")
            if name == "none":
                continue
            if name == "kv" and not options:
                fields["kv"] = True
            elif name == "patches":
                fields["patches"] = True
                for item in filter(None, (o.strip() for o in options.split(","))):
                    key, _, value = item.partition("=")
                    try:
                        if key == "threshold":
                            fields["threshold"] = float(value)
                        elif key == "refresh":
                            fields["refresh_every"] = int(value)
                        else:
                            raise ReuseSpecError(f"unknown key {key!r} in reuse spec {text!r}; "
                                                 f"patches takes threshold= and refresh=")
                    except ValueError:
                        raise ReuseSpecError(f"bad value {value!r} for {key!r} in reuse spec {text!r}") from None
            else:
                raise ReuseSpecError(f"unknown reuse {part!r} in {text!r}; choose none, kv, "
                                     f"patches[:threshold=T,refresh=N] or kv+patches")
        spec = cls(**fields)
        if not 0 <= spec.threshold < 1 or spec.refresh_every < 1:
            raise ReuseSpecError(f"reuse spec {text!r}: threshold must be in [0, 1) and refresh >= 1")
        return spec

    def __str__(self) -> str:
        parts = ["kv"] if self.kv else []
        if self.patches:
            parts.append(f"patches:threshold={self.threshold:g},refresh={self.refresh_every}")
        return "+".join(parts) or "none"
