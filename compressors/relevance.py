"""ToDRE stage 2: task relevance inside the LM.

In middle layers, visual information migrates into the text tokens: the question's attention
to visual tokens fades. Our rule (ToDRE publishes no code, so the choice is ours): after each
layer l, measure the text->visual attention mass, the share of the question tokens' attention
that lands on visual tokens (mean over the question's tokens and heads). At the first layer
where it falls below `threshold`, the remaining visual tokens leave the sequence (all of
them, or all but the `keep_fraction` most attended). A fixed `layer` skips the measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressors.protocol import LayerObservation


@dataclass
class TaskRelevanceHook:
    layers: tuple[int, ...]
    threshold: float  # text->visual attention mass below which visual tokens are dropped
    keep_fraction: float = 0.0  # share of the visual tokens kept (the most attended) when dropping
    fixed_layer: bool = False  # drop at the first observed layer whatever the mass
    wants: str = "attention"
    dropped_at: int | None = None  # the layer where visual tokens were dropped (reported)
    masses: tuple[float, ...] = ()  # the measured mass per observed layer, for the record

    def select(self, observation: LayerObservation) -> torch.Tensor:
        visual = observation.is_visual
        keep = torch.ones_like(visual)
        if self.dropped_at is not None or not bool(visual.any()):
            return keep
        attention = observation.text_attention  # [Q, L]
        mass = float(attention[:, visual].sum(-1).mean())
        self.masses = (*self.masses, round(mass, 4))
        if not self.fixed_layer and mass >= self.threshold:
            return keep
        self.dropped_at = observation.layer
        visual_at = visual.nonzero()[:, 0]
        keep[visual_at] = False
        kept = round(self.keep_fraction * len(visual_at))
        if kept:
            keep[visual_at[torch.topk(attention[:, visual_at].mean(0), kept).indices]] = True
        return keep
