"""Train a learned compressor (hicom, quecc) on ShapesWorld on top of the frozen vidsieve-tiny.

Only the compressor learns: every model weight is frozen, and the loss is the model's own
answer loss (`train_tiny.answer_loss`: teacher-forced cross-entropy on the answer tokens) with
the clip's visual tokens replaced by the compressor's output. Each clip draws its budget from
`TRAIN_BUDGETS`, the sizes the accuracy benchmark asks for, so one set of weights serves them
all. Clips are generated on the fly from a range of training seeds the tiny model never saw.

The weights are saved as `<model folder>/compressors/<name>.safetensors`, where
`VLM.compressor_state(name)` finds them; `vidsieve train compressor NAME` calls
`train_compressor`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from compressors import Budget, CompressorSpec, VisualTokens, parse_spec
from eval import shapesworld as sw
from eval.train_tiny import answer_loss, optimizer_step
from kernels.errors import VidsieveError
from vlm.model import VLM

# The budgets a training clip is compressed to: the method's own size and the benchmark's.
TRAIN_BUDGETS = (
    Budget(), Budget(ratio=0.5), Budget(ratio=0.25), Budget(ratio=0.1), Budget(per_frame=1),
)
FIRST_TRAIN_CLIP = 20_000_000  # train_tiny used clips below this index


@dataclass
class CompressorTrainConfig:
    clips_per_step: int = 8  # every question of each clip is asked
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    max_steps: int | None = None  # a step-counted run: this many steps, the schedule over them (time is a cap)
    report_every: int = 25
    log: list = field(default_factory=list)


def train_compressor(
    model: VLM,
    name: str,
    minutes: float,
    *,
    config: CompressorTrainConfig | None = None,
    folder: str | Path | None = None,
    report: Callable[[str], None] = print,
) -> Path:
    """Train compressor `name` (a spec string's name or alias) for `minutes` of wall time, or,
    with `config.max_steps`, for that many steps (the learning-rate schedule runs over the
    steps, so the run is the same on a busy or an idle machine; `minutes` is then a cap).

    The model is frozen in place (requires_grad False, eval mode). `folder` is the model
    folder to save into (default: the folder the model was loaded from). Returns the path of
    the saved weights.
    """
    config = config or CompressorTrainConfig()
    spec = parse_spec(name)
    compressor = spec.compressor
    if not compressor.trainable or compressor.stage != "pre_llm":
        raise VidsieveError(f"compressor {spec.name!r} has no weights to train; "
                            "learned pre-LLM compressors: hicom, quecc")
    folder = Path(folder) if folder is not None else model.folder
    if folder is None:
        raise VidsieveError("the model was not loaded from a folder; pass folder=... to save into")

    torch.manual_seed(config.seed)
    model.requires_grad_(False).eval()
    with torch.no_grad():
        question_width = getattr(model, compressor.question_source)("").numel()
    # Fresh weights (never the ones already shipped beside the model), for LM-width tokens.
    compressor.module = compressor.new_module(model.lm.config.hidden_size, question_width)
    parameters = list(compressor.module.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    eos = model.tokenizer.eos_token_id
    total_s = 60 * minutes
    deadline = time.monotonic() + total_s
    step, index = 0, 0
    while time.monotonic() < deadline and (config.max_steps is None or step < config.max_steps):
        sequences = []
        for tokens, questions in _clips(model, FIRST_TRAIN_CLIP + index, config.clips_per_step):
            budget = rng.choice(TRAIN_BUDGETS)
            clip_spec = CompressorSpec(spec.name, compressor, budget, f"{spec.name}:{budget}")
            for question in questions:
                prompt = model.prepare(tokens, question.text, clip_spec, seed=config.seed)
                answer_ids = model.tokenizer(question.answer, add_special_tokens=False).input_ids + [eos]
                sequences.append((prompt, answer_ids))
        index += config.clips_per_step
        loss, accuracy = answer_loss(model, sequences)
        progress = ((step + 1) / config.max_steps if config.max_steps
                    else 1 - (deadline - time.monotonic()) / total_s)
        optimizer_step(optimizer, parameters, loss, config.lr, progress)
        step += 1
        config.log.append({"step": step, "clips": index, "loss": loss.item(), "train_acc": accuracy})
        if step % config.report_every == 0:
            report(f"{spec.name} step {step} clips {index} loss {loss.item():.3f} "
                   f"first-token acc {accuracy:.3f}")

    path = folder / "compressors" / f"{spec.name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in compressor.module.state_dict().items()}
    settings = {k: v for k, v in asdict(config).items() if k != "log"}
    save_file(state, path, metadata={"trained_by": f"vidsieve train compressor {spec.name}",
                                     "steps": str(step), "clips": str(index), "minutes": str(minutes),
                                     "train_config": json.dumps(settings)})
    report(f"saved {spec.name} weights after {step} steps ({index} clips) to {path}")
    return path


def _clips(model: VLM, start: int, count: int) -> list[tuple[VisualTokens, list[sw.Question]]]:
    """(visual tokens, questions) of `count` training clips, encoded by the frozen model."""
    clips = [(sw.render(scene), questions)
             for scene, questions in (sw.scene_and_questions("train", start + i) for i in range(count))]
    with torch.no_grad():
        features = model.encoder(model.encoder.preprocess_clips([frames for frames, _ in clips]))
        features = features.view(count, -1, *features.shape[1:])  # [B, T, G, G, width]
        embeds = [model.projector(clip_features) for clip_features in features]  # [T, H, W, D] each
    return [(VisualTokens.from_grid(clip_embeds, np.arange(len(frames)) / 8.0), questions)
            for clip_embeds, (frames, questions) in zip(embeds, clips)]
