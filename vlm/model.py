"""VLM: vision encoder -> projector -> compressor -> LM runner, saved and loaded as one folder.

The folder format is the same for every vidsieve-native model, trained or not:
`config.json` (a `VLMConfig`), `model.safetensors` (all weights) and the tokenizer files.
`VLM.from_pretrained` takes such a folder, a preset name such as `vidsieve-tiny`, or a hub id.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from compressors import CompressionContext, CompressorSpec, VisualTokens, parse_spec
from compressors.protocol import PruneHook
from kernels import AttentionSpec
from kernels.errors import VidsieveError
from vlm.device import resolve_device, resolve_dtype
from vlm.encoder import OpenClipEncoder, PatchReuseEncoder
from vlm.kv import KVState
from vlm.lm_runner import LMRunner, SamplingParams
from vlm.projector import Projector
from vlm.tokenizer import build_word_tokenizer

EMBEDDED_WEIGHTS = Path(__file__).parent / "weights"
NATIVE_MODEL_TYPE = "vidsieve"


class UnknownModelError(VidsieveError):
    """A model name, folder or hub id that vidsieve cannot load."""


# Words the untrained default tokenizer knows; a trained model ships its own tokenizer.json.
TINY_WORDS = (
    "what which where when how many is are the a an of in on at to from and or does do did "
    "colour color shape size object objects move moves moving direction first last appear appears "
    "appeared disappear left right up down top bottom middle centre center corner still "
    "red green blue yellow purple orange white cyan circle square triangle cross diamond star "
    "small big large tiny dot frame time start end zero one two three four five six seven eight "
    "nine ten yes no ? , ."
).split()


@dataclass
class VLMConfig:
    """Everything needed to rebuild the architecture; weights live beside it."""

    name: str
    vision: dict  # open_clip CLIPVisionCfg fields (image_size, patch_size, width, layers, ...)
    lm: dict  # a HF decoder config (`model_type` plus its fields)
    spatial_merge: int = 2  # merge x merge patches become one LM token
    place_scale: float = 0.25  # amplitude of the projector's row/column sinusoids (vlm.projector)
    time_scale: float = 0.25  # and of its frame sinusoids
    num_frames: int = 16  # frames per clip the model was trained on (the default sampling plan)
    chat_template: str = "<user> {video} {question} <assistant>"
    model_type: str = NATIVE_MODEL_TYPE
    trained: bool = False
    notes: dict = field(default_factory=dict)

    @classmethod
    def from_name(cls, name: str) -> "VLMConfig":
        if name not in PRESETS:
            raise UnknownModelError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return cls(**json.loads(json.dumps(PRESETS[name])))  # deep copy

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


PRESETS = {
    "vidsieve-tiny": {
        "name": "vidsieve-tiny",
        "vision": {"image_size": 128, "patch_size": 16, "width": 96, "layers": 3, "head_width": 32,
                   "mlp_ratio": 2.0, "conv_stem": [16, 32, 48, 64]},
        "lm": {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 128, "intermediate_size": 384,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 4096, "rope_theta": 1_000_000.0, "tie_word_embeddings": True},
    },
}


@dataclass
class PreparedPrompt:
    """Inputs to the LM for one (video, question): embeddings with their positions and slot metadata."""

    embeds: torch.Tensor  # [L, D]
    positions: torch.Tensor  # [L] absolute position ids (survivors keep their original ones)
    is_visual: torch.Tensor  # [L] bool
    frame_index: torch.Tensor  # [L] int64, -1 for text
    visual_before: int
    visual_after: int  # after pre-LLM compression; an in-LLM hook may drop more during prefill
    hook: PruneHook | None = None


@dataclass
class PrefilledVideo:
    """The KV of a prompt up to the end of its video, computed once and shared by every question."""

    state: KVState
    video_slots: int  # slots of the prefix + kept visual tokens; questions are appended after
    question_position: int  # true position of the question's first token (prefix + full span)
    visual_before: int
    visual_after: int


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    visual_before: int
    visual_after: int
    timings_s: dict[str, float]
    finish_reason: str


class VideoAnswering:
    """The answering pipeline every model shares: encode -> compress -> prefill -> decode.

    A model provides `encode_frames(frames, timestamps_s) -> VisualTokens`, `prepare(tokens,
    question, spec) -> PreparedPrompt`, `_prefill_with_carriers(tokens, question, memory)`
    (VideoScan's frame-by-frame prefill), `runner`, `tokenizer`, `counters` and `folder`.
    vidsieve-native models (`VLM`) and the Hugging Face adapters (`vlm.adapters`) both do.
    """

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def compressor_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """Trained weights of a learned compressor shipped beside this model
        (`<model folder>/compressors/<name>.safetensors`), or None when there are none."""
        if self.folder is None or not (self.folder / "compressors" / f"{name}.safetensors").is_file():
            return None
        return load_file(self.folder / "compressors" / f"{name}.safetensors", device=str(self.device))

    def _compress(self, tokens: VisualTokens, question: str, spec: CompressorSpec,
                  seed: int) -> tuple[VisualTokens, PruneHook | None]:
        """The tokens a pre-LLM compressor keeps for `question` (all of them for an in-LLM one),
        and the prune hook the LM runner should call, if any."""
        ctx = CompressionContext(question=question, budget=spec.budget, seed=seed, model=self)
        kept = spec.compressor.compress(tokens, ctx) if spec.compressor.stage == "pre_llm" else tokens
        hook = spec.compressor.hook(ctx, len(self.runner.layers)) if hasattr(spec.compressor, "hook") else None
        return kept, hook

    def stream(self, frames: np.ndarray, timestamps_s, question: str, spec: CompressorSpec | str = "none",
               sampling: SamplingParams | None = None, timings_s: dict | None = None) -> Iterator[int]:
        """Yield answer token ids as they are produced; `timings_s` gets encode/compress/prefill/generate."""
        timings = timings_s if timings_s is not None else {}
        start = time.perf_counter()
        tokens = self.encode_frames(frames, timestamps_s)
        timings["encode"] = time.perf_counter() - start
        yield from self.stream_tokens(tokens, question, spec, sampling, timings)

    def stream_tokens(self, tokens: VisualTokens, question: str, spec: CompressorSpec | str = "none",
                      sampling: SamplingParams | None = None, timings_s: dict | None = None) -> Iterator[int]:
        """Like `stream`, from visual tokens already encoded (one encode, many questions)."""
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        sampling = sampling or self.default_sampling()
        timings = timings_s if timings_s is not None else {}
        start = time.perf_counter()
        prompt = self.prepare(tokens, question, spec, seed=sampling.seed)
        timings["compress"] = time.perf_counter() - start
        start = time.perf_counter()
        if hasattr(spec.compressor, "new_memory"):  # VideoScan: frame by frame, carriers only
            state, logits = self._prefill_with_carriers(tokens, question, spec.compressor.new_memory())
        else:
            state, logits = self.runner.prefill(prompt.embeds, prompt.positions, is_visual=prompt.is_visual,
                                                frame_index=prompt.frame_index, hook=prompt.hook)
        self.counters["full_prefills"] += 1
        timings["visual_before"], timings["visual_after"] = prompt.visual_before, int(state.is_visual.sum())
        timings["prefill"] = time.perf_counter() - start
        start = time.perf_counter()
        yield from self.runner.decode(state, logits, sampling)
        timings["generate"] = time.perf_counter() - start

    def answer(self, frames: np.ndarray, timestamps_s, question: str, spec: CompressorSpec | str = "none",
               sampling: SamplingParams | None = None) -> Answer:
        """Run the whole pipeline and return the decoded answer with counts and timings."""
        timings: dict = {"encode": 0.0}
        start = time.perf_counter()
        tokens = self.encode_frames(frames, timestamps_s)
        timings["encode"] = time.perf_counter() - start
        return self.answer_tokens(tokens, question, spec, sampling, timings)

    def answer_tokens(self, tokens: VisualTokens, question: str, spec: CompressorSpec | str = "none",
                      sampling: SamplingParams | None = None, timings_s: dict | None = None) -> Answer:
        """`answer` from visual tokens already encoded."""
        timings = timings_s if timings_s is not None else {}
        sampling = sampling or self.default_sampling()
        ids = list(self.stream_tokens(tokens, question, spec, sampling, timings))
        finish = "stop" if ids and ids[-1] in sampling.stop_token_ids else "length"
        before, after = timings.pop("visual_before"), timings.pop("visual_after")
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Answer(text, ids, before, after, timings, finish)

    def shares_video_kv(self, spec: CompressorSpec) -> bool:
        """Whether one prefill of a video can serve every question under `spec`: a pre-LLM
        compressor that neither reads the question nor prunes inside the LM."""
        compressor = spec.compressor
        if compressor.stage != "pre_llm" or compressor.uses_question:
            return False
        ctx = CompressionContext(budget=spec.budget, model=self)
        return not hasattr(compressor, "hook") or compressor.hook(ctx, len(self.runner.layers)) is None

    def default_sampling(self, max_new_tokens: int = 32) -> SamplingParams:
        """Greedy, stopping at the tokenizer's EOS."""
        return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(self.tokenizer.eos_token_id,))


class VLM(VideoAnswering, nn.Module):
    """A vidsieve-native video-language model (vidsieve-tiny and friends)."""

    def __init__(self, config: VLMConfig, tokenizer: PreTrainedTokenizerFast):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = OpenClipEncoder(config.vision)
        lm_config = AutoConfig.for_model(**config.lm)
        lm_config._attn_implementation = "sdpa"
        self.lm = AutoModelForCausalLM.from_config(lm_config)
        self.projector = Projector(self.encoder.width, lm_config.hidden_size, merge=config.spatial_merge,
                                   place_scale=config.place_scale, time_scale=config.time_scale)
        self.runner = LMRunner(self.lm)
        self.counters: Counter = Counter()  # full_prefills, video_prefills, question_prefills
        self.folder: Path | None = None  # where the weights were loaded from

    # --- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: VLMConfig, *, seed: int = 0) -> "VLM":
        """A randomly initialised model (deterministic under `seed`)."""
        torch.manual_seed(seed)
        tokenizer = build_word_tokenizer(TINY_WORDS)
        if len(tokenizer) > config.lm["vocab_size"]:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, LM vocab is {config.lm['vocab_size']}")
        return cls(config, tokenizer).eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | None = None, dtype: str | None = None,
                        attention: str = "dense") -> "VideoAnswering":
        """Load a folder, preset or hub id. `attention` is a spec such as `bra:topk=8,block=64`.

        A Hugging Face checkpoint of a supported family (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
        SmolVLM2) loads through its adapter in `vlm.adapters`, chosen by the config's model_type.
        """
        spec = AttentionSpec.parse(attention)
        model_type = read_model_type(name_or_path)
        if model_type != NATIVE_MODEL_TYPE:
            from vlm.adapters import load_adapter

            return load_adapter(model_type, name_or_path, device=device, dtype=dtype, attention=spec)
        folder = resolve_model_folder(name_or_path)
        target = resolve_device(device)
        if folder is None:  # a preset with no embedded weights: random init, flagged untrained
            model = cls.from_config(VLMConfig.from_name(str(name_or_path)))
        else:
            config = read_config(folder)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
            model = cls(config, tokenizer)
            state = load_file(folder / "model.safetensors")
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to embeddings
            if missing or unexpected:
                raise UnknownModelError(f"weights in {folder} do not match its config: "
                                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            model.lm.tie_weights()
            model.folder = folder
            model.eval()
        model.runner.attention_spec = spec
        return model.to(device=target, dtype=resolve_dtype(dtype, target))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(self.config.to_json())
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()
                 if not (name == "lm.lm_head.weight" and self.lm.config.tie_word_embeddings)}
        save_file(state, folder / "model.safetensors")
        self.tokenizer.save_pretrained(folder)

    @property
    def display_name(self) -> str:
        return self.config.name if self.config.trained else f"{self.config.name} (random init, untrained)"

    # --- the pipeline -----------------------------------------------------------------------

    def question_state(self, text: str) -> torch.Tensor:
        """The LM's last-layer hidden state [D] at the last token of a text-only pass over
        `text` (QueCC's query conditioning)."""
        ids = self._ids(text)
        if ids.numel() == 0:
            ids = torch.tensor([self.tokenizer.unk_token_id])
        output = self.lm.model(input_ids=ids[None].to(self.device))
        return output.last_hidden_state[0, -1]

    def embed_text(self, text: str) -> torch.Tensor:
        """A question embedding for instruction-conditioned compressors: mean LM input embedding [D]
        (vidsieve-tiny has no text tower)."""
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() == 0:
            return torch.zeros(self.lm.config.hidden_size, device=self.device, dtype=self.runner.dtype)
        return self.runner.embed(ids).mean(0)

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray, timestamps_s, encoder: PatchReuseEncoder | None = None) -> VisualTokens:
        """uint8 frames [T, H, W, 3] -> projected visual tokens, T * (H_grid/m) * (W_grid/m) of them.

        `encoder`: a `PatchReuseEncoder` over this model's tower to re-encode only changed patches.
        """
        features = (encoder or self.encoder).encode(frames).tokens  # [T, Hg, Wg, D_vision]
        embeds = self.projector(features)  # [T, Hg/m, Wg/m, D_lm]
        return VisualTokens.from_grid(embeds, torch.as_tensor(timestamps_s, dtype=torch.float64))

    def prepare(self, tokens: VisualTokens, question: str, spec: CompressorSpec, *, seed: int = 0) -> PreparedPrompt:
        """Compress visual tokens for `question` and lay out the whole prompt around them."""
        kept, hook = self._compress(tokens, question, spec, seed)
        prefix_ids, suffix_ids = self._prompt_ids(question)
        video = self._layout(prefix_ids, kept, torch.arange(len(prefix_ids)))
        after_video = self.text_position(len(prefix_ids), len(prefix_ids) + tokens.span_length, frame_span(tokens))
        question_part = self._layout(suffix_ids, None, after_video + torch.arange(len(suffix_ids)))
        return PreparedPrompt(*(torch.cat(pair) for pair in zip(video, question_part)), len(tokens), len(kept), hook)

    def prefill_video(self, tokens: VisualTokens, spec: CompressorSpec | str = "none", *, seed: int = 0) -> PrefilledVideo:
        """Prefill the prompt up to the end of the video once; `stream_reused` answers any
        number of questions from it without prefilling the video again (ENAT-style reuse).

        Only for compressors that do not read the question (`uses_question` False): a
        question-conditioned selection differs per question, so its KV cannot be shared.
        """
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        ctx = CompressionContext(question="", budget=spec.budget, seed=seed, model=self)
        if not self.shares_video_kv(spec):
            raise VidsieveError(f"compressor {spec.name!r} depends on the question or acts inside the LM, so a "
                                f"video's KV cannot be reused across questions; answer each with its own prefill")
        if not self.config.chat_template.split("{video}")[1].lstrip().startswith("{question}"):
            raise VidsieveError("KV reuse needs a chat template where the question follows the video")
        kept = spec.compressor.compress(tokens, ctx)
        prefix_ids, _ = self._prompt_ids("")
        embeds, positions, is_visual, frame_index = self._layout(prefix_ids, kept, torch.arange(len(prefix_ids)))
        state = self.runner.new_state(capacity=len(embeds) + 64)
        self.runner.forward(embeds, positions, state, is_visual=is_visual, frame_index=frame_index)
        self.counters["video_prefills"] += 1
        after_video = self.text_position(len(prefix_ids), len(prefix_ids) + tokens.span_length, frame_span(tokens))
        return PrefilledVideo(state, state.length, after_video, len(tokens), len(kept))

    def stream_reused(self, video: PrefilledVideo, question: str, sampling: SamplingParams | None = None,
                      timings_s: dict | None = None) -> Iterator[int]:
        """Answer `question` from a prefilled video: only the question's tokens are prefilled.
        The video's KV is restored afterwards, so the next question starts from the same state."""
        sampling = sampling or self.default_sampling()
        timings = timings_s if timings_s is not None else {}
        _, suffix_ids = self._prompt_ids(question)
        start = time.perf_counter()
        logits = self.runner.forward(self.runner.embed(suffix_ids),
                                     video.question_position + torch.arange(len(suffix_ids)), video.state)
        timings["prefill"] = time.perf_counter() - start
        self.counters["question_prefills"] += 1
        start = time.perf_counter()
        try:
            yield from self.runner.decode(video.state, logits, sampling)
        finally:
            video.state.truncate(video.video_slots)
            video.state.next_position = video.question_position
            timings["generate"] = time.perf_counter() - start

    def _prefill_with_carriers(self, tokens: VisualTokens, question: str, memory) -> tuple[KVState, torch.Tensor]:
        """Prefill the prompt one frame at a time under a VideoScan `CarrierMemory`: each frame's
        tokens and its carrier go in, then only the carriers held by the memory stay."""
        prefix_ids, suffix_ids = self._prompt_ids(question)
        state = self.runner.new_state(capacity=len(prefix_ids) + 2 * tokens.grid_thw[1] * tokens.grid_thw[2] + 256)
        self.runner.forward(self.runner.embed(prefix_ids), torch.arange(len(prefix_ids)), state)
        position = len(prefix_ids)
        for frame in tokens.frame_index.unique(sorted=True):
            chunk = memory.frame_chunk(tokens.select(tokens.frame_index == frame), position)
            self.runner.forward(chunk.embeds.to(self.runner.dtype), chunk.positions, state,
                                is_visual=torch.ones(len(chunk.embeds), dtype=torch.bool), frame_index=chunk.frame_index)
            memory.admit(chunk)
            state.evict(memory.keep_mask(state.positions, state.is_visual))
            position = chunk.carrier_position + 1
        position = self.text_position(len(prefix_ids), position, frame_span(tokens) + 1)  # + 1: the carrier
        logits = self.runner.forward(self.runner.embed(suffix_ids), position + torch.arange(len(suffix_ids)), state)
        return state, logits

    def _prompt_ids(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the template before and after the video, the question filled in."""
        prefix_text, suffix_text = self.config.chat_template.split("{video}")
        return self._ids(prefix_text), self._ids(suffix_text.replace("{question}", question))

    def text_position(self, video_start: int, video_end: int, frame_positions: int) -> int:
        """Where the text after a video starts: after the video (`video_end`), and no earlier than
        after `config.num_frames` frames of `frame_positions` positions each, the clip length the
        model was trained on. A clip with fewer frames (a stream so far, a few images) is then
        laid out as training laid out a clip whose later frames a compressor dropped, with the
        question where it always sat. (Measured on the shipped model, 10 attribute questions
        about 8-frame clips: 3 right laid out compactly, 9 right laid out this way;
        docs/TRAINING.md.)"""
        return max(video_end, video_start + self.config.num_frames * frame_positions)

    def _layout(self, text_ids: torch.Tensor, visual: VisualTokens | None, text_positions: torch.Tensor):
        """(embeds, positions, is_visual, frame_index) of text ids followed by visual tokens.
        Visual tokens sit at their ORIGINAL positions, counted from the end of the text."""
        embeds = [self.runner.embed(text_ids)]
        positions = [text_positions]
        is_visual = [torch.zeros(len(text_ids), dtype=torch.bool)]
        frame_index = [torch.full((len(text_ids),), -1)]
        if visual is not None:
            embeds.append(visual.embeds.to(self.runner.dtype))
            positions.append(len(text_ids) + visual.positions[:, 0].cpu())
            is_visual.append(torch.ones(len(visual), dtype=torch.bool))
            frame_index.append(visual.frame_index.cpu())
        return torch.cat(embeds), torch.cat(positions), torch.cat(is_visual), torch.cat(frame_index)

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text.strip(), add_special_tokens=False, return_tensors="pt").input_ids[0]


def frame_span(tokens: VisualTokens) -> int:
    """Positions one frame of `tokens` takes: its token grid's rows x columns (1d positions)."""
    _, rows, columns = tokens.grid_thw
    return rows * columns


def resolve_model_folder(name_or_path: str | Path, *, config_only: bool = False) -> Path | None:
    """A folder holding config.json, or None for a preset without embedded weights.
    `config_only`: of a hub repo, fetch config.json alone."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"model folder {path} has no config.json")
        return path
    name = str(name_or_path)
    embedded = EMBEDDED_WEIGHTS / name
    if (embedded / "model.safetensors").is_file():
        return embedded
    if name in PRESETS:
        return None
    if path.suffix or name.startswith((".", "/")) or name.count("/") != 1:
        raise UnknownModelError(f"unknown model {name!r}: not a folder, not a preset "
                                f"({', '.join(sorted(PRESETS))}) and not a hub id (owner/name)")
    return download_from_hub(name, config_only=config_only)


def read_model_type(name_or_path: str | Path) -> str | None:
    """The model_type a folder, preset or hub id declares ("vidsieve" for presets); of a hub
    repo only config.json is fetched here."""
    folder = resolve_model_folder(name_or_path, config_only=True)
    if folder is None:
        return NATIVE_MODEL_TYPE
    return json.loads((folder / "config.json").read_text()).get("model_type")


def download_from_hub(repo_id: str, *, config_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if config_only:
            return Path(hf_hub_download(repo_id, "config.json")).parent
        return Path(snapshot_download(repo_id))
    except Exception as error:  # offline, missing repo, auth: all mean "cannot load"
        raise UnknownModelError(f"cannot load model {repo_id!r} from the Hugging Face hub: "
                                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None


def read_config(folder: Path) -> VLMConfig:
    raw = json.loads((folder / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type != NATIVE_MODEL_TYPE:
        raise UnknownModelError(f"model in {folder} has model_type {model_type!r}; "
                                f"supported: {NATIVE_MODEL_TYPE!r} (vidsieve-native models)")
    return VLMConfig(**raw)
