"""VideoScan: one semantic carrier per frame, and only the carriers stay in memory.

For each frame t, the carrier c_t = mean(F_t) (the mean of the frame's projected tokens) is
appended after the frame's tokens; [F_t, c_t] are prefilled with the earlier carriers in the
cache, so c_t attends to its frame and to the past; then F_t's slots leave the cache and only
c_t's stay. When more than `memory` carriers are held, the earlier carrier of the most
similar adjacent pair (cosine of the carriers' embeddings) is dropped.

Positions: every carrier takes a real position right after its frame, so the clip's layout is
[F_0, c_0, F_1, c_1, ...] and every slot keeps the position it was computed at; text after
the video continues after the last carrier. (The public code re-derives positions over the
compacted sequence while cached keys keep their old rotation; here nothing is renumbered.)

`CarrierMemory` is the policy; the one-shot `videoscan` compressor runs it over a whole clip,
and the streaming session runs the same policy frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressors.context import CompressionContext
from compressors.registry import SpecError, register_compressor
from compressors.tokens import VisualTokens


@dataclass
class FrameChunk:
    """One frame's tokens followed by its carrier, laid out for prefill."""

    embeds: torch.Tensor  # [n + 1, D]
    positions: torch.Tensor  # [n + 1] absolute
    frame_index: torch.Tensor  # [n + 1]
    carrier_position: int


class CarrierMemory:
    """Which slots a VideoScan memory keeps: text, and at most `limit` carriers."""

    def __init__(self, limit: int = 64):
        if limit < 1:
            raise SpecError(f"videoscan: memory must be >= 1, got {limit}")
        self.limit = limit
        self.carrier_positions: list[int] = []
        self.carrier_embeds: list[torch.Tensor] = []  # [D] each, for the similarity rule

    def frame_chunk(self, frame_tokens: VisualTokens, first_position: int) -> FrameChunk:
        """frame_tokens: one frame's tokens; they take positions first_position.. in their own order
        (gaps from pruning kept), and the carrier the position after the frame's span."""
        relative = frame_tokens.positions[:, 0] - frame_tokens.positions[:, 0].min()
        frame_span = int(relative.max()) + 1 if len(frame_tokens) else 0
        carrier = frame_tokens.embeds.mean(0, keepdim=True)  # [1, D]
        carrier_position = first_position + frame_span
        frame = int(frame_tokens.frame_index[0])
        return FrameChunk(
            embeds=torch.cat([frame_tokens.embeds, carrier]),
            positions=torch.cat([first_position + relative.cpu(), torch.tensor([carrier_position])]),
            frame_index=torch.full((len(frame_tokens) + 1,), frame),
            carrier_position=carrier_position,
        )

    def admit(self, chunk: FrameChunk) -> None:
        """Record the carrier of a prefilled chunk; forget one if the memory is over its limit."""
        self.carrier_positions.append(chunk.carrier_position)
        self.carrier_embeds.append(chunk.embeds[-1].detach().float())
        if len(self.carrier_positions) > self.limit:
            stacked = torch.stack(self.carrier_embeds)
            similarity = torch.cosine_similarity(stacked[:-1], stacked[1:], dim=-1)  # adjacent pairs
            drop = int(similarity.argmax())  # the earlier of the most similar pair
            del self.carrier_positions[drop], self.carrier_embeds[drop]

    def keep_mask(self, positions: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
        """[S] bool over cache slots (positions [S, P], is_visual [S]): text and held carriers."""
        held = torch.tensor(self.carrier_positions, device=positions.device)
        return ~is_visual | torch.isin(positions[:, 0], held)


@register_compressor("videoscan")
@dataclass
class VideoScan:
    """VideoScan: one mean-token carrier per frame; frame tokens leave the cache after their prefill."""

    stage = "in_llm"
    trainable = False
    uses_question = False
    memory: int = field(default=64, metadata={"help": "most carriers held; the most redundant adjacent one goes"})

    def __post_init__(self) -> None:
        if self.memory < 1:
            raise SpecError(f"videoscan: memory must be >= 1, got {self.memory}")

    def compress(self, tokens: VisualTokens, ctx: CompressionContext) -> VisualTokens:
        """Nothing happens before the LM: the runner prefills frame by frame with `new_memory()`."""
        return tokens

    def new_memory(self) -> CarrierMemory:
        return CarrierMemory(self.memory)
