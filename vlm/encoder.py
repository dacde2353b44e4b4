"""Vision encoders: frames in, patch tokens out.

Encoders take arrays, not `streaming.Frame`s, so `vlm/` does not depend on how frames arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncodedFrames:
    tokens: torch.Tensor  # [T, H_grid, W_grid, D] patch features
    grid: tuple[int, int]  # (H_grid, W_grid)


class VisionEncoder(Protocol):
    """Turns RGB frames uint8 [T, H, W, 3] into patch tokens [T, H_grid, W_grid, D]."""

    width: int

    def encode(self, frames: np.ndarray | torch.Tensor) -> EncodedFrames: ...


class OpenClipEncoder(nn.Module):
    """An open_clip VisionTransformer returning its patch tokens (after `ln_post`).

    Frames are resized to the tower's square input, normalised with CLIP statistics and run
    in chunks so memory stays bounded for long clips.
    """

    def __init__(self, vision_cfg: dict, *, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, chunk_frames: int = 32):
        super().__init__()
        from open_clip.model import _build_vision_tower

        cfg = dict(vision_cfg, output_tokens=True)
        self.visual = _build_vision_tower(embed_dim=cfg.pop("embed_dim", cfg["width"]), vision_cfg=cfg)
        self.image_size = int(cfg["image_size"])
        self.patch_size = int(cfg["patch_size"])
        self.width = int(cfg["width"])
        self.chunk_frames = chunk_frames
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> normalised float [T, 3, S, S] on the encoder's device/dtype."""
        param = next(self.visual.parameters())
        pixels = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
        pixels = pixels.to(param.device).permute(0, 3, 1, 2).float() / 255.0
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return ((pixels - self.mean) / self.std).to(param.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [T, 3, S, S] -> patch tokens [T, H_grid, W_grid, D]."""
        _, tokens = self.visual(pixels)  # [T, H_grid * W_grid, D]
        return tokens.view(tokens.shape[0], *self.grid, tokens.shape[-1])

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor) -> EncodedFrames:
        chunks = [self(self.preprocess(frames[start:start + self.chunk_frames]))
                  for start in range(0, len(frames), self.chunk_frames)]
        return EncodedFrames(tokens=torch.cat(chunks), grid=self.grid)
