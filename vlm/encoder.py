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
# A motion-input tower (`motion_input` in its config) sees each frame's change from the frame
# before as three more channels, pixel differences in [-1, 1] times this gain (about the
# spread of the normalised colour channels).
MOTION_GAIN = 2.0


@dataclass(frozen=True)
class EncodedFrames:
    tokens: torch.Tensor  # [T, H_grid, W_grid, D] patch features
    grid: tuple[int, int]  # (H_grid, W_grid)


class VisionEncoder(Protocol):
    """Turns RGB frames uint8 [T, H, W, 3] into patch tokens [T, H_grid, W_grid, D].

    `previous`: the frame before frames[0], for encoders that read motion (a stream passes its
    last frame); others ignore it."""

    width: int

    def encode(self, frames: np.ndarray | torch.Tensor, previous: np.ndarray | torch.Tensor | None = None
               ) -> EncodedFrames: ...


class ConvStem(nn.Sequential):
    """A convolutional stem in place of the ViT's patch embedding ("Early Convolutions Help
    Transformers See Better", Xiao et al. 2021): 3x3 convolutions of stride 2, one per
    halving, until a patch is one token (4 for 16 px patches), then a 1x1 projection to the
    tower's width.

    A linear 16x16 patch embedding sees one patch at a time: a small object straddling patch
    borders shows each token a fragment, and telling a circle from a diamond needs the
    fragments put together. Each stem output sees about 31 px around its patch, so a token can
    hold the shape of the object it covers and the colour of a dot inside it (per-patch
    accuracies after training in docs/TRAINING.md).
    """

    def __init__(self, channels: list[int], width: int, patch_size: int, in_channels: int = 3):
        if patch_size != 2 ** len(channels):
            raise ValueError(f"conv_stem needs one stride-2 layer per halving of the {patch_size} px patch; "
                             f"got {len(channels)} layers")
        layers: list[nn.Module] = []
        previous = in_channels
        for count in channels:
            layers += [nn.Conv2d(previous, count, 3, stride=2, padding=1), nn.GroupNorm(1, count), nn.GELU()]
            previous = count
        super().__init__(*layers, nn.Conv2d(previous, width, 1))


class OpenClipEncoder(nn.Module):
    """An open_clip VisionTransformer returning its patch tokens (after `ln_post`).

    Frames are resized to the tower's square input, normalised with CLIP statistics and run
    in chunks so memory stays bounded for long clips. `conv_stem: [C1, C2, ...]` in the config
    puts a `ConvStem` with those channels in place of the tower's patch embedding (`conv1`).

    `motion_input: true` (with a conv stem) gives the stem each frame's difference from the
    frame before as three more input channels, as two-stream video networks feed RGB
    differences beside RGB: one frame's tokens can then say which way an object moves and
    whether it just appeared, which no single still frame shows. The frame before the first
    is `previous` if given (a stream's last frame), else the frame itself (no change).
    """

    def __init__(self, vision_cfg: dict, *, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, chunk_frames: int = 32):
        super().__init__()
        from open_clip.model import _build_vision_tower

        cfg = dict(vision_cfg, output_tokens=True)
        stem_channels = cfg.pop("conv_stem", None)
        self.motion_input = bool(cfg.pop("motion_input", False))
        if self.motion_input and not stem_channels:
            raise ValueError("motion_input needs a conv_stem (the ViT's own patch embedding takes RGB only)")
        self.visual = _build_vision_tower(embed_dim=cfg.pop("embed_dim", cfg["width"]), vision_cfg=cfg)
        if stem_channels:
            self.visual.conv1 = ConvStem(list(stem_channels), cfg["width"], cfg["patch_size"],
                                         in_channels=6 if self.motion_input else 3)
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

    def resized(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float [T, 3, S, S] in [0, 1] on the encoder's device."""
        param = next(self.visual.parameters())
        pixels = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
        pixels = pixels.to(param.device).permute(0, 3, 1, 2).float() / 255.0
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return pixels

    def preprocess(self, frames: np.ndarray | torch.Tensor, previous: np.ndarray | torch.Tensor | None = None
                   ) -> torch.Tensor:
        """uint8 [T, H, W, 3] frames of one clip -> the tower's input [T, C, S, S] on its
        device/dtype: normalised RGB (C = 3), and with `motion_input` each frame's change from the
        one before (C = 6). `previous` [H, W, 3]: the frame before frames[0], if any."""
        before = self.resized(previous[None]) if self.motion_input and previous is not None else None
        return self.tower_input(self.resized(frames), before)

    def tower_input(self, pixels: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """Resized frames [T, 3, S, S] in [0, 1] (and the resized frame before them, [1, 3, S, S])
        -> the tower's input, as `preprocess`."""
        normalised = (pixels - self.mean) / self.std
        if self.motion_input:
            change = pixels - torch.cat([pixels[:1] if before is None else before, pixels[:-1]])
            normalised = torch.cat([normalised, change * MOTION_GAIN], dim=1)
        return normalised.to(next(self.visual.parameters()).dtype)

    def preprocess_clips(self, clips: list[np.ndarray]) -> torch.Tensor:
        """Several clips' frames -> one batch of tower inputs; no clip sees another's frames as its past."""
        return torch.cat([self.preprocess(frames) for frames in clips])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tower inputs [T, C, S, S] (from `preprocess`) -> patch tokens [T, H_grid, W_grid, D]."""
        _, tokens = self.visual(pixels)  # [T, H_grid * W_grid, D]
        return tokens.view(tokens.shape[0], *self.grid, tokens.shape[-1])

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, previous: np.ndarray | torch.Tensor | None = None
               ) -> EncodedFrames:
        """uint8 frames [T, H, W, 3] of one clip or stream -> patch tokens. `previous`: the frame
        before frames[0] (a stream's last), read by a motion-input tower only."""
        chunks = []
        for start in range(0, len(frames), self.chunk_frames):
            before = frames[start - 1] if start else previous
            chunks.append(self(self.preprocess(frames[start:start + self.chunk_frames], before)))
        return EncodedFrames(tokens=torch.cat(chunks), grid=self.grid)


@dataclass
class PatchReuseStats:
    """What the patch-reuse encoder skipped: a patch is recomputed in every layer or in none."""

    frames: int = 0
    full_frames: int = 0  # first frame, refreshes, and frames where everything changed
    patches: int = 0  # patch slots seen (frames x patches per frame)
    patches_recomputed: int = 0

    @property
    def skipped_fraction(self) -> float:
        return 1 - self.patches_recomputed / self.patches if self.patches else 0.0


class PatchReuseEncoder:
    """ENAT-style reuse for a frame sequence: re-encode only the patches that changed.

    Frame by frame, a patch whose pixels moved by more than `threshold` (mean absolute
    difference, pixel values in [0, 1]) from the previous frame (or, behind a `ConvStem`,
    whose neighbour did) is recomputed through every layer, its queries attending over all
    tokens; every other patch keeps last frame's per-layer states. The class token is always
    recomputed. Unchanged tokens ignore what their changed neighbours now say, so error
    accumulates: every `refresh_every` frames the whole frame is recomputed. State carries across `encode` calls, so a stream can feed frames as
    they arrive; `reset()` starts afresh. Behind a motion-input tower a patch's input is also its
    change from the frame before, so a patch that changed last frame (its change now gone) is
    recomputed too.
    """

    def __init__(self, encoder: OpenClipEncoder, *, threshold: float = 0.02, refresh_every: int = 8):
        from open_clip.transformer import ResidualAttentionBlock

        blocks = list(encoder.visual.transformer.resblocks)
        if not all(type(block) is ResidualAttentionBlock for block in blocks):
            raise TypeError("patch reuse supports open_clip's standard ResidualAttentionBlock only")
        self.encoder = encoder
        self.blocks = blocks
        self.threshold = threshold
        self.refresh_every = refresh_every
        self.stats = PatchReuseStats()
        self.reset()

    def reset(self) -> None:
        self._previous_pixels: torch.Tensor | None = None  # [1, 3, S, S] in [0, 1]: the last frame encoded
        self._before_first: torch.Tensor | None = None  # the same for a stream's frame before the first
        self._previous_changed: torch.Tensor | None = None  # [G, G] bool: what changed last frame
        self._layer_inputs: list[torch.Tensor] = []  # per layer [1, 1 + N, width], plus the output
        self._since_refresh = 0

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, previous: np.ndarray | torch.Tensor | None = None
               ) -> EncodedFrames:
        """`previous` is read only by a fresh (or reset) encoder; after that it follows its own frames."""
        if self._previous_pixels is None and previous is not None:
            self._before_first = self.encoder.resized(previous[None])
        tokens = [self._encode_one(frames[index:index + 1]) for index in range(len(frames))]
        return EncodedFrames(tokens=torch.cat(tokens), grid=self.encoder.grid)

    def _encode_one(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One frame uint8 [1, H, W, 3] -> patch tokens [1, H_grid, W_grid, width]."""
        visual = self.encoder.visual
        raw = self.encoder.resized(frame)  # [1, 3, S, S] in [0, 1], for the change test
        before = self._before_first if self._previous_pixels is None else self._previous_pixels
        pixels = self.encoder.tower_input(raw, before)  # [1, C, S, S]
        changed = self._changed_patches(raw)  # [N] bool, or None for a full frame
        embedded = visual._embeds(pixels)  # [1, 1 + N, width]
        num_patches = embedded.shape[1] - 1
        self.stats.frames += 1
        self.stats.patches += num_patches
        if changed is None:
            states = [embedded]
            for block in self.blocks:
                states.append(block(states[-1]))
            self._layer_inputs = states
            self._since_refresh = 0
            self.stats.full_frames += 1
            self.stats.patches_recomputed += num_patches
        else:
            rows = torch.cat([torch.zeros(1, dtype=torch.long, device=changed.device), changed.nonzero()[:, 0] + 1])
            self.stats.patches_recomputed += len(rows) - 1
            current = self._layer_inputs[0].clone()
            current[:, rows] = embedded[:, rows]
            states = [current]
            for layer, block in enumerate(self.blocks):
                normed = block.ln_1(current)
                updated = current[:, rows] + block.ls_1(block.attention(q_x=normed[:, rows], k_x=normed, v_x=normed))
                updated = updated + block.ls_2(block.mlp(block.ln_2(updated)))
                current = self._layer_inputs[layer + 1].clone()
                current[:, rows] = updated
                states.append(current)
            self._layer_inputs = states
            self._since_refresh += 1
        self._previous_pixels = raw
        _, tokens = visual._pool(self._layer_inputs[-1])  # [1, N, width]
        return tokens.view(1, *self.encoder.grid, tokens.shape[-1])

    def _changed_patches(self, raw: torch.Tensor) -> torch.Tensor | None:
        """[N] bool per patch, or None when the whole frame must be recomputed."""
        if self._previous_pixels is None:
            return None
        patch = self.encoder.patch_size
        difference = (raw - self._previous_pixels).abs().mean(1)  # [1, S, S]
        moved = F.avg_pool2d(difference[:, None], patch)[0, 0] > self.threshold  # [G, G]
        changed = moved
        if self.encoder.motion_input and self._previous_changed is not None:
            changed = moved | self._previous_changed  # its change channels go from motion to none
        self._previous_changed = moved
        if self._since_refresh + 1 >= self.refresh_every:
            return None
        if isinstance(self.encoder.visual.conv1, ConvStem):
            # A conv stem's token sees about one patch beyond its own: a change next door changes it too.
            changed = F.max_pool2d(changed[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
        changed = changed.flatten()  # [N]
        return None if bool(changed.all()) else changed
