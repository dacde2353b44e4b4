"""Qwen2-VL (`qwen2_vl`) and Qwen2.5-VL (`qwen2_5_vl`): a native-resolution ViT whose 2x2
patch merger makes the LM tokens, and a language model with 3-D M-RoPE.

Frames go in pairs (`temporal_patch_size`): a token-grid frame is one pair, timed at its first
frame. Positions are (t, h, w) exactly as the model's own `get_rope_index` gives them (on
Qwen2.5-VL, t is scaled to absolute time by `tokens_per_second` and the clip's frame rate);
text after the span continues where `get_rope_index` puts it.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from vlm.adapters.base import HFVideoLM, MediaKind, SlotGrid, raster_grid, register_adapter

MODALITY = {"image": 1, "video": 2}  # mm_token_type_ids: 0 text, 1 image, 2 video


@register_adapter("qwen2_vl")
class Qwen2VLAdapter(HFVideoLM):
    family = "Qwen2-VL"
    model_class = Qwen2VLForConditionalGeneration

    def _features(self, kind: MediaKind, inputs: BatchFeature) -> torch.Tensor:
        model = self.model.model
        if kind == "video":
            output = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
        else:
            output = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return torch.cat(output.pooler_output)

    def _slot_grid(self, kind: MediaKind, inputs: BatchFeature, features: torch.Tensor) -> SlotGrid:
        merge = self.model.config.vision_config.spatial_merge_size
        frames, height, width = (int(n) for n in inputs[f"{kind}_grid_thw"][0])
        grid = (frames, height // merge, width // merge)
        frame_index, grid_rc = raster_grid(*grid)
        return SlotGrid(torch.ones(len(features), dtype=torch.bool), frame_index, grid_rc, grid)

    def _frame_times(self, timestamps_s: np.ndarray, grid_frames: int) -> np.ndarray:
        firsts = timestamps_s[:: self.model.config.vision_config.temporal_patch_size]
        return np.pad(firsts, (0, grid_frames - len(firsts)), mode="edge")

    def _span_positions(self, kind: MediaKind, inputs: BatchFeature, span_ids: torch.Tensor,
                        token_offsets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """get_rope_index over the span and one text token after it, from position 0."""
        ids = torch.cat([span_ids, span_ids[-1:]])[None].to(self.device)
        token_types = torch.full_like(ids, MODALITY[kind])
        token_types[0, -1] = 0
        grids = {key: inputs[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                 if key in inputs}
        position_ids, _ = self.model.model.get_rope_index(ids, token_types, **grids)  # [3, 1, S + 1]
        positions = position_ids[:, 0].T.cpu()  # [S + 1, 3]
        return positions[:-1][token_offsets], int(positions[-1, 0])


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "Qwen2.5-VL"
    model_class = Qwen2_5_VLForConditionalGeneration
