"""SmolVLM2 (`smolvlm`): SigLIP tower, pixel-shuffle connector, Llama language model.

Every frame of a clip is an image of `image_seq_len` tokens (a square grid after the pixel
shuffle). The processor writes an introduction, then per frame "Frame from MM:SS:" and the
frame's tokens between <fake_token_around_image> markers: the text between frames is glue.
An image is split into crops plus a global view; each is a frame of the token grid.
"""

from __future__ import annotations

import math

import torch
from transformers import BatchFeature, SmolVLMForConditionalGeneration

from vlm.adapters.base import HFVideoLM, MediaKind, SlotGrid, raster_grid, register_adapter


@register_adapter("smolvlm")
class SmolVLMAdapter(HFVideoLM):
    family = "SmolVLM2"
    model_class = SmolVLMForConditionalGeneration

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    def _slot_token_id(self, kind: MediaKind) -> int:
        return self.processor.image_token_id  # frames are images

    def _features(self, kind: MediaKind, inputs: BatchFeature) -> torch.Tensor:
        output = self.model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"),
                                                     return_dict=True)
        return torch.cat(output.pooler_output)

    def _slot_grid(self, kind: MediaKind, inputs: BatchFeature, features: torch.Tensor) -> SlotGrid:
        per_view = self.processor.image_seq_len
        side = math.isqrt(per_view)
        views = len(features) // per_view
        frame_index, grid_rc = raster_grid(views, side, side)
        return SlotGrid(torch.ones(len(features), dtype=torch.bool), frame_index, grid_rc, (views, side, side))
