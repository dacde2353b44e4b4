"""What every Hugging Face adapter shares: loading, encoding through the processor, the prompt
layout around compressed tokens, and VideoScan's frame-by-frame prefill.

A prompt is built exactly as the family's own processor builds it:

1. `encode_frames` / `encode_image`: the processor turns pixels into model inputs and into the
   text that replaces the chat template's media placeholder (`MediaSpan.replacement`); the
   model turns the inputs into the features it would scatter into the placeholder slots. The
   span runs from the first slot to the last. Slots that hold a patch become `VisualTokens`
   (frame, grid cell, ORIGINAL position relative to the span start); everything else in the
   span is glue: text between frames (SmolVLM's "Frame from 00:01:"), LLaVA's newline feature.
2. `prepare`: the chat template is rendered around the question with the replacement in place
   and tokenized whole, so BPE merges at the span's edges are the processor's own; ids before
   the span are the prefix, ids after it the suffix. The kept tokens go in at their original
   positions, the glue always stays, and the suffix continues at prefix + span_length.

The language model runs through our `LMRunner` (M-RoPE for Qwen2-VL / Qwen2.5-VL).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from transformers import AutoProcessor, BatchFeature
from transformers.video_utils import VideoMetadata

from compressors import CompressorSpec, VisualTokens
from compressors.videoscan import CarrierMemory, FrameChunk
from kernels import AttentionSpec
from kernels.errors import VidsieveError
from vlm.device import resolve_device, resolve_dtype
from vlm.kv import TEXT_FRAME, KVState
from vlm.lm_runner import LMRunner, SamplingParams
from vlm.model import PreparedPrompt, UnknownModelError, VideoAnswering

MediaKind = Literal["image", "video"]

ADAPTERS: dict[str, type["HFVideoLM"]] = {}  # config model_type -> adapter class


def register_adapter(*model_types: str):
    """Class decorator: the adapter loads checkpoints whose config has one of `model_types`."""

    def decorator(cls: type[HFVideoLM]) -> type[HFVideoLM]:
        for model_type in model_types:
            if model_type in ADAPTERS:
                raise ValueError(f"model type {model_type!r} already has an adapter: {ADAPTERS[model_type].__name__}")
            ADAPTERS[model_type] = cls
        return cls

    return decorator


@dataclass(frozen=True)
class DecoderWithHead:
    """A VLM's language model shaped like a `*ForCausalLM` for the `LMRunner`."""

    model: torch.nn.Module  # embed_tokens, layers, norm, rotary_emb
    lm_head: torch.nn.Module
    config: object


@dataclass(frozen=True)
class AdapterConfig:
    """What the front doors read from a model's config (`VLMConfig` for native models)."""

    name: str  # hub id or folder name
    model_type: str
    family: str
    num_frames: int  # frames per clip when the user sets no sampling plan
    trained: bool = True  # a real checkpoint


@dataclass(frozen=True, eq=False)
class MediaSpan:
    """The question-independent part of a prompt that one image or clip occupies."""

    kind: MediaKind  # which placeholder the chat template gets
    replacement: str  # what the processor puts in place of the placeholder
    span_ids: torch.Tensor  # [S] token ids from the first feature slot to the last
    glue_offsets: torch.Tensor  # [G] offsets in the span of slots that are not visual tokens
    glue_embeds: torch.Tensor  # [G, D] their input embeddings


@dataclass(frozen=True, eq=False)
class MediaTokens(VisualTokens):
    """`VisualTokens` of one image or clip, with the span they came from. `select`/`merge` keep
    `media`; `prepare` reads it from the tokens it is given (before compression)."""

    media: MediaSpan | None = None


@dataclass(frozen=True)
class SlotGrid:
    """Where each feature of a span sits: in the token grid, or nowhere (glue)."""

    is_token: torch.Tensor  # [F] bool over the features, in slot order
    frame_index: torch.Tensor  # [N] frame (video) or view (image: base / crop / global) of each token
    grid_rc: torch.Tensor  # [N, 2]
    grid_thw: tuple[int, int, int]


def clip_metadata(timestamps_s: np.ndarray) -> VideoMetadata:
    """The clip as the video processors see it: its frames were already sampled (no sampling
    here), at the clip's own frame rate, at their true times."""
    count = len(timestamps_s)
    span_s = float(timestamps_s[-1] - timestamps_s[0]) if count > 1 else 0.0
    fps = (count - 1) / span_s if span_s > 0 else 1.0
    indices = np.round(timestamps_s * fps).astype(int)
    return VideoMetadata(total_num_frames=count, fps=fps, frames_indices=indices.tolist(),
                         duration=float(timestamps_s[-1]) + 1 / fps)


def raster_grid(frames: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame [N], (row, col) [N, 2]) of frames x rows x cols tokens in row-major order."""
    frame = torch.arange(frames).repeat_interleave(rows * cols)
    row = torch.arange(rows).repeat_interleave(cols).repeat(frames)
    col = torch.arange(cols).repeat(frames * rows)
    return frame, torch.stack([row, col], dim=1)


class HFVideoLM(VideoAnswering):
    """A Hugging Face video-language model run through vidsieve's pipeline.

    A family subclass names its model class and language model, and says how its processor's
    output becomes features (`_features`) and where each feature sits (`_slot_grid`).
    """

    family: ClassVar[str]
    model_class: ClassVar[type]
    default_num_frames: ClassVar[int] = 16

    def __init__(self, model: torch.nn.Module, processor, *, name: str, folder: Path | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.runner = LMRunner(DecoderWithHead(self.language_model, model.lm_head, model.config.text_config))
        num_frames = getattr(getattr(processor, "video_processor", None), "num_frames", None)
        self.config = AdapterConfig(name=name, model_type=model.config.model_type, family=self.family,
                                    num_frames=num_frames or self.default_num_frames)
        self.counters: Counter = Counter()  # full_prefills
        self.folder = folder  # where learned compressor weights may ship (`compressors/<name>.safetensors`)

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str | None = None, dtype: str | None = None,
                        attention: AttentionSpec | None = None) -> "HFVideoLM":
        """A local folder or hub id, with the family's own `from_pretrained` and processor."""
        target = resolve_device(device)
        try:
            model = cls.model_class.from_pretrained(source, dtype=resolve_dtype(dtype, target))
            processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise UnknownModelError(f"cannot load {cls.family} model {str(source)!r}: "
                                    f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        folder = Path(source) if Path(source).is_dir() else None
        adapter = cls(model.to(target), processor, name=str(source), folder=folder)
        adapter.runner.attention_spec = attention or AttentionSpec()
        return adapter

    @property
    def display_name(self) -> str:
        return f"{self.config.name} ({self.family})"

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack inside the HF model (embed_tokens, layers, norm, rotary_emb)."""
        return self.model.model.language_model

    # --- what a family says -------------------------------------------------------------------

    def _features(self, kind: MediaKind, inputs: BatchFeature) -> torch.Tensor:
        """[F, D] the features the model scatters into the span's slots, in slot order."""
        raise NotImplementedError

    def _slot_grid(self, kind: MediaKind, inputs: BatchFeature, features: torch.Tensor) -> SlotGrid:
        raise NotImplementedError

    def _slot_token_id(self, kind: MediaKind) -> int:
        """The token id of the slots features fill."""
        return self.processor.image_token_id if kind == "image" else self.processor.video_token_id

    def _frame_times(self, timestamps_s: np.ndarray, grid_frames: int) -> np.ndarray:
        """Timestamp of each of the grid's frames."""
        return timestamps_s

    def _span_positions(self, kind: MediaKind, inputs: BatchFeature, span_ids: torch.Tensor,
                        token_offsets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(positions [N, P] of the tokens relative to the span start, span_length). 1-D RoPE:
        a token's position is its offset in the span."""
        return token_offsets[:, None], len(span_ids)

    # --- encoding ---------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray, timestamps_s, encoder: None = None) -> MediaTokens:
        """uint8 frames [T, H, W, 3] of one clip -> its visual tokens, as the family's video
        processor and vision tower make them (the frames are taken as sampled)."""
        if encoder is not None:
            raise VidsieveError(f"{self.family}: patch reuse needs a vidsieve-native vision encoder")
        timestamps = np.asarray(timestamps_s, dtype=np.float64)
        inputs = self.processor(text=[self.processor.video_token], videos=[np.asarray(frames)],
                                video_metadata=[clip_metadata(timestamps)], do_sample_frames=False,
                                return_tensors="pt", return_text_replacement_offsets=True)
        return self._tokens("video", inputs, timestamps)

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray) -> MediaTokens:
        """uint8 image [H, W, 3] -> its visual tokens (each view the processor makes of it, e.g.
        a base view and a high-resolution one, is a frame of the token grid, at time 0)."""
        inputs = self.processor(text=[self.processor.image_token], images=[np.asarray(image)],
                                return_tensors="pt", return_text_replacement_offsets=True)
        return self._tokens("image", inputs, None)

    def _tokens(self, kind: MediaKind, inputs: BatchFeature, timestamps_s: np.ndarray | None) -> MediaTokens:
        replacement = inputs.pop("text_replacement_offsets")[0][0]["replacement"]
        ids = inputs.pop("input_ids")[0]
        inputs = BatchFeature({key: value.to(self.device, self.runner.dtype) if key.startswith("pixel_values")
                               else value.to(self.device)
                               for key, value in inputs.items() if isinstance(value, torch.Tensor)})
        slot_id = self._slot_token_id(kind)
        slots = (ids == slot_id).nonzero()[:, 0]
        span_ids = ids[int(slots[0]): int(slots[-1]) + 1]
        features = self._features(kind, inputs)  # [F, D]
        grid = self._slot_grid(kind, inputs, features)
        slot_offsets = (span_ids == slot_id).nonzero()[:, 0]  # [F]
        text_offsets = (span_ids != slot_id).nonzero()[:, 0]
        token_offsets = slot_offsets[grid.is_token]
        is_token = grid.is_token.to(features.device)
        glue_offsets = torch.cat([text_offsets, slot_offsets[~grid.is_token]])
        glue_embeds = torch.cat([self.runner.embed(span_ids[text_offsets]), features[~is_token]])
        order = glue_offsets.argsort()
        positions, span_length = self._span_positions(kind, inputs, span_ids, token_offsets)
        if positions.shape[1] > 1 and len(glue_offsets):
            raise VidsieveError(f"{self.family}: glue inside a span with 3-D positions is not supported")
        frame_times = (np.zeros(grid.grid_thw[0]) if timestamps_s is None
                       else self._frame_times(timestamps_s, grid.grid_thw[0]))
        timestamps = torch.as_tensor(frame_times, dtype=torch.float64)[grid.frame_index]
        media = MediaSpan(kind, replacement, span_ids, glue_offsets[order], glue_embeds[order])
        return MediaTokens(embeds=features[is_token], frame_index=grid.frame_index.to(self.device),
                           grid_rc=grid.grid_rc.to(self.device), timestamp_s=timestamps.to(self.device),
                           positions=positions.to(self.device), grid_thw=grid.grid_thw, span_length=span_length,
                           media=media)

    # --- the prompt ---------------------------------------------------------------------------

    def prepare(self, tokens: VisualTokens, question: str, spec: CompressorSpec, *, seed: int = 0) -> PreparedPrompt:
        """Compress visual tokens for `question` and lay out the whole prompt around them."""
        media = self._media(tokens)
        kept, hook = self._compress(tokens, question, spec, seed)
        prefix_ids, suffix_ids = self._prompt_ids(question, media)
        span_start, span_end = len(prefix_ids), len(prefix_ids) + tokens.span_length
        glue = len(media.glue_offsets)
        span_embeds = torch.cat([media.glue_embeds.to(self.device, self.runner.dtype),
                                 kept.embeds.to(self.runner.dtype)])
        span_positions = torch.cat([self._text_positions(media.glue_offsets), kept.positions.cpu()])
        span_frames = torch.cat([torch.full((glue,), TEXT_FRAME), kept.frame_index.cpu()])
        span_visual = torch.arange(glue + len(kept)) >= glue
        if glue:  # 1-D positions: glue and tokens interleave by offset
            order = torch.argsort(span_positions[:, 0], stable=True)
            span_embeds, span_positions = span_embeds[order.to(self.device)], span_positions[order]
            span_frames, span_visual = span_frames[order], span_visual[order]
        positions = torch.cat([self._text_positions(torch.arange(span_start)), span_start + span_positions,
                               self._text_positions(span_end + torch.arange(len(suffix_ids)))])
        return PreparedPrompt(
            embeds=torch.cat([self.runner.embed(prefix_ids), span_embeds, self.runner.embed(suffix_ids)]),
            positions=positions[:, 0] if self.runner.position_dims == 1 else positions,
            is_visual=torch.cat([torch.zeros(span_start, dtype=torch.bool), span_visual,
                                 torch.zeros(len(suffix_ids), dtype=torch.bool)]),
            frame_index=torch.cat([torch.full((span_start,), TEXT_FRAME), span_frames,
                                   torch.full((len(suffix_ids),), TEXT_FRAME)]),
            visual_before=len(tokens), visual_after=len(kept), hook=hook)

    def _media(self, tokens: VisualTokens) -> MediaSpan:
        media = getattr(tokens, "media", None)
        if media is None:
            raise VidsieveError(f"{self.family} needs the tokens made by its own encode_frames or encode_image "
                                f"(they carry the prompt span they belong to)")
        return media

    def _text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[L] -> [L, P]: text has one position, repeated on every M-RoPE axis."""
        return positions.long()[:, None].expand(-1, self.runner.position_dims)

    def _prompt_ids(self, question: str, media: MediaSpan) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids before and after the media span in the chat-templated prompt, exactly as
        the processor tokenizes it (the whole prompt at once)."""
        conversation = [{"role": "user", "content": [{"type": media.kind}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        replacements = {f"{media.kind}s_replacements": [media.replacement]}
        text = self.processor.get_text_with_replacements([text], **replacements)[0][0]
        # as the processor's apply_chat_template: no second BOS when the template writes one
        bos = self.tokenizer.bos_token
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids)
        slots = (ids == int(media.span_ids[0])).nonzero()[:, 0]
        start = int(slots[0]) if len(slots) else -1
        span = ids[start: start + len(media.span_ids)]
        if start < 0 or not torch.equal(span, media.span_ids):
            raise VidsieveError(f"{self.family}: the question splits the media span; remove media tokens from it")
        return ids[:start], ids[start + len(media.span_ids):]

    def embed_text(self, text: str) -> torch.Tensor:
        """A question embedding for instruction-conditioned compressors: mean LM input embedding [D]."""
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() == 0:
            return torch.zeros(self.runner.config.hidden_size, device=self.device, dtype=self.runner.dtype)
        return self.runner.embed(ids).mean(0)

    def question_state(self, text: str) -> torch.Tensor:
        """The LM's last-layer hidden state [D] at the last token of a text-only pass over `text`."""
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() == 0:
            ids = torch.tensor([self.tokenizer.eos_token_id])
        return self.language_model(input_ids=ids[None].to(self.device)).last_hidden_state[0, -1]

    def default_sampling(self, max_new_tokens: int = 32) -> SamplingParams:
        """Greedy, stopping where the model's generation config stops (its EOS ids)."""
        eos = self.model.generation_config.eos_token_id
        stop = [eos] if isinstance(eos, int) else list(eos or [])
        return SamplingParams(max_new_tokens=max_new_tokens,
                              stop_token_ids=tuple(stop) or (self.tokenizer.eos_token_id,))

    @property
    def encoder(self):
        raise VidsieveError(f"{self.family}: patch reuse needs a vidsieve-native vision encoder")

    def prefill_video(self, tokens: VisualTokens, spec: CompressorSpec | str = "none", *, seed: int = 0):
        raise VidsieveError(f"{self.family}: KV reuse across questions is for vidsieve-native models; "
                            f"answer each question with its own prefill")

    # --- VideoScan ----------------------------------------------------------------------------

    def _prefill_with_carriers(self, tokens: VisualTokens, question: str,
                               memory: CarrierMemory) -> tuple[KVState, torch.Tensor]:
        """Prefill frame by frame under a VideoScan `CarrierMemory`: each chunk is the glue up to
        a frame's last token, the frame's tokens and the frame's carrier (their mean); then only
        the carriers the memory holds stay.

        Carrier positions: with 1-D RoPE a carrier takes the position after its frame and every
        later slot moves up by one (as for native models); with M-RoPE it takes the frame's
        centre (t, mean row, mean col) and nothing moves.
        """
        media = self._media(tokens)
        prefix_ids, suffix_ids = self._prompt_ids(question, media)
        span_start, mrope = len(prefix_ids), self.runner.position_dims > 1
        state = self.runner.new_state(capacity=2 * len(prefix_ids) + 2 * tokens.grid_thw[1] * tokens.grid_thw[2] + 256)
        self.runner.forward(self.runner.embed(prefix_ids), torch.arange(span_start), state)
        slot_keys = torch.arange(span_start)  # tell slots apart for the memory (M-RoPE positions repeat)
        glue_offsets, glue_embeds = media.glue_offsets, media.glue_embeds.to(self.device, self.runner.dtype)
        glue_done, shift = 0, 0
        for frame in tokens.frame_index.unique(sorted=True):
            frame_tokens = tokens.select(tokens.frame_index == frame)
            carrier = frame_tokens.embeds.mean(0, keepdim=True).to(self.runner.dtype)  # [1, D]
            if mrope:
                centre = frame_tokens.positions.float().mean(0).round().long()[None]  # [1, 3]
                positions = span_start + torch.cat([frame_tokens.positions, centre]).cpu()
                embeds = torch.cat([frame_tokens.embeds.to(self.runner.dtype), carrier])
                is_visual = torch.ones(len(embeds), dtype=torch.bool)
            else:
                last_offset = int(frame_tokens.positions[:, 0].max())
                glue_here = slice(glue_done, glue_done + int((glue_offsets[glue_done:] <= last_offset).sum()))
                glue_done = glue_here.stop
                offsets = torch.cat([glue_offsets[glue_here], frame_tokens.positions[:, 0].cpu()])
                visual = torch.arange(len(offsets)) >= glue_here.stop - glue_here.start
                order = torch.argsort(offsets, stable=True)
                chunk = torch.cat([glue_embeds[glue_here], frame_tokens.embeds.to(self.runner.dtype)])
                positions = span_start + shift + torch.cat([offsets[order], torch.tensor([last_offset + 1])])
                embeds = torch.cat([chunk[order.to(self.device)], carrier])
                is_visual = torch.cat([visual[order], torch.tensor([True])])
                shift += 1
            frame_index = torch.where(is_visual, int(frame), TEXT_FRAME)
            self.runner.forward(embeds, positions, state, is_visual=is_visual, frame_index=frame_index)
            keys = int(slot_keys.max()) + 1 + torch.arange(len(embeds))
            slot_keys = torch.cat([slot_keys, keys])
            # the memory tells carriers apart by `carrier_position`; slot keys serve (unique, also for M-RoPE)
            memory.admit(FrameChunk(embeds, keys, frame_index, carrier_position=int(keys[-1])))
            keep = memory.keep_mask(slot_keys[:, None].to(self.device), state.is_visual)
            state.evict(keep)
            slot_keys = slot_keys[keep.cpu()]
        rest = torch.cat([glue_embeds[glue_done:], self.runner.embed(suffix_ids)])
        rest_offsets = torch.cat([glue_offsets[glue_done:], tokens.span_length + torch.arange(len(suffix_ids))])
        logits = self.runner.forward(rest, span_start + shift + rest_offsets, state)
        return state, logits
