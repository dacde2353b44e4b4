"""LLaVA-OneVision (`llava_onevision`): SigLIP tower, 2-layer projector, Qwen2 language model.

Video: each frame's patch grid is pooled 2x2 (bilinear), frames follow each other, and one
newline feature closes the clip (glue). Image ("anyres"): a base view of the whole image,
then a high-resolution view cut from the best-fitting grid of crops and unpadded to the
image's aspect, each of its rows closed by the newline feature (glue). The two views are
frames 0 and 1 of the token grid.
"""

from __future__ import annotations

import math

import torch
from transformers import BatchFeature, LlavaOnevisionForConditionalGeneration

from vlm.adapters.base import HFVideoLM, MediaKind, SlotGrid, raster_grid, register_adapter


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(HFVideoLM):
    family = "LLaVA-OneVision"
    model_class = LlavaOnevisionForConditionalGeneration
    default_num_frames = 32  # the paper's video setting

    def _features(self, kind: MediaKind, inputs: BatchFeature) -> torch.Tensor:
        model = self.model.model
        if kind == "video":
            return model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output[0]
        output = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                          batch_num_images=inputs.get("batch_num_images"), return_dict=True)
        return output.pooler_output[0]

    def _slot_grid(self, kind: MediaKind, inputs: BatchFeature, features: torch.Tensor) -> SlotGrid:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size  # patches per side of one view
        # the newline is the model's own parameter, copied into its slots unchanged
        is_newline = (features == self.model.model.image_newline.to(features.dtype)).all(-1).cpu()
        if kind == "video":
            frames, pooled = inputs["pixel_values_videos"].shape[1], math.ceil(side / 2)
            frame_index, grid_rc = raster_grid(frames, pooled, pooled)
            return SlotGrid(~is_newline, frame_index, grid_rc, (frames, pooled, pooled))
        base_frame, base_rc = raster_grid(1, side, side)
        rows = int(is_newline[side * side:].sum())
        cols = (len(features) - side * side - rows) // rows
        high_frame, high_rc = raster_grid(1, rows, cols)
        views = 2 if cols else 1  # one view only when the processor made no crops
        return SlotGrid(~is_newline, torch.cat([base_frame, high_frame + 1]), torch.cat([base_rc, high_rc]),
                        (views, max(side, rows), max(side, cols)))
