"""Train vidsieve-tiny on ShapesWorld: perception first, then question answering.

Real VLMs are trained in stages, and a synthetic world gives dense labels for free:

1. Perception. The vision tower alone learns, for every 16x16 patch of every frame, the
   colour, shape and size of the object covering most of it and the colour of a fine-detail
   dot inside it. Targets are per patch and come from the scene state, so tokens stay local:
   nothing rewards smearing the scene into every patch. Fresh clips every step.
2. Question answering. With the tower frozen, the projector (patch merge, where/when
   embeddings) and the language model learn to answer ShapesWorld questions. Each clip's
   visual tokens go through a randomly chosen compressor first (random drops, pooling,
   frame subsets), so the model is robust to missing tokens as real VLMs are to variable
   frame counts and resolutions; about a third of clips keep every token.

   QA clips are rendered and encoded by the frozen tower once (`ClipPool`) and revisited
   over several epochs, each visit under a fresh augmentation.

Every stage is counted in steps and seeded, so the same command is the same run on a CPU or
a GPU; worker processes render clips beside the training loop. `vidsieve train tiny --out
FOLDER` runs both stages and saves through `save_pretrained` at every validation pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from compressors import CompressionContext, CompressorSpec, VisualTokens, parse_spec
from eval import shapesworld as sw
from vlm.model import VLM, VLMConfig, frame_span
from vlm.tokenizer import build_word_tokenizer

# Compressors a training clip goes through, with their sampling weights: full tokens a third
# of the time, the rest spread over the kinds of loss a compressor inflicts.
AUGMENTATIONS = (
    ("none", 6), ("random:ratio=0.75", 1), ("random:ratio=0.5", 2), ("random:ratio=0.25", 2),
    ("random:ratio=0.1", 1), ("avgpool:factor=2", 2), ("uniform:every=2", 2), ("random:per_frame=2", 1),
)

# Stage 3 (`train_robust`) draws heavy dropping twice as often: after stage 2, a quarter of the
# tokens cost counting 17.5 points on ShapesWorld v2 (run R: over-counting fragments of one
# object seen in several frames, and start / end counts whose frame lost an object), and
# attribute 10.1.
ROBUST_AUGMENTATIONS = (
    ("none", 4), ("random:ratio=0.75", 1), ("random:ratio=0.5", 2), ("random:ratio=0.25", 4),
    ("random:ratio=0.1", 2), ("avgpool:factor=2", 1), ("uniform:every=2", 1), ("random:per_frame=2", 1),
)
ROBUST_EVAL_SPEC = "random:ratio=0.25"  # stage 3 also validates under it
# ...and teaches temporal order only on clips that keep every token. Run S taught it wherever
# the kept tokens still showed the order and learnt to answer by elimination (`uniform:every=4`,
# the questions whose order frames 0, 4, 8, 12 do not show: 54% -> 65%, chance 47%), the guess
# the benchmark is there to catch; run U did not teach it at all and forgot it (validation
# 90% -> 66% by step 1000).
ROBUST_WHOLE_ONLY_TYPES = frozenset({"temporal_order"})

# The QA curriculum: (steps, frames kept per clip) before whole clips. Reading one object among
# 256 tokens does not start from scratch: the head that finds it and the words that name it have
# to form together, and with many tokens in view neither gets a gradient (measured on a synthetic
# task with one-hot features, `python -m eval.probe_binding`: 16 tokens learn in 150 steps, 64
# and 256 sit at chance). Formed on short clips, the circuit carries over to whole clips at once.
CURRICULUM = ((1000, 1), (500, 2), (500, 4))
# Question types whose answer one frame can show (the curriculum asks only these).
FRAME_LOCAL_TYPES = frozenset({"attribute", "fine_detail", "instruction", "position"})
# ...and those one frame answers when the tower also sees its change from the frame before.
MOTION_LOCAL_TYPES = frozenset({"motion"})


@dataclass
class TrainConfig:
    """Every stage is counted in steps, so a run is the same run on any machine (CPU or GPU)."""

    perception_steps: int = 6000  # 3000 left the dot at 45% once the tower also learnt motion (run M)
    perception_clips_per_step: int = 4  # x 16 frames
    perception_lr: float = 2e-3
    qa_pool_clips: int = 12_000  # rendered and put through the frozen tower once, then reused
    qa_steps: int = 5000
    qa_clips_per_step: int = 24  # every question of each clip is asked (packed, see PackedClip)
    qa_lr: float = 1.5e-3
    weight_decay: float = 0.01
    binding: bool = True  # supervise one attention head with the scene's object locations (BINDING_LAYER)
    look_weight: float = 0.0  # on the first-look / last-look heads; 0: off (runs F, G, I: docs/TRAINING.md)
    query_weight: float = 1.0  # on the naming head of QUERY_LAYER (the question's naming words); 0: off
    readout_weight: float = 1.0  # on ObjectReadout (the object head's output names its object's facts); 0: off
    count_weight: float = 1.0  # on the count head (COUNT_HEAD: the sink and one token per counted object); 0: off
    curriculum: tuple = CURRICULUM  # (steps, frames) before whole clips; counted in qa_steps
    robust_steps: int = 1500  # stage 3 (train_robust), run AA (docs/TRAINING.md); 0: stages 1-2 only (run R)
    robust_lr: float = 5e-4
    # Stage 2's training clips also count at the start or end (ShapesWorld v2's counts), as the
    # shipped run R was taught; the benchmark and stage 3 ask whole-clip counts only.
    moment_counts: bool = True
    identity_weight: float = 1.0  # stage 3: on the identity head (IDENTITY_HEAD, `identity_targets`); 0: off
    seed: int = 0
    eval_every: int = 500  # QA steps between validation passes (and checkpoints)
    eval_clips: int = 120
    device: str = "cpu"
    workers: int = 1  # processes that render clips beside the training loop (0: render inline)
    perception_from: str | None = None  # a model folder whose tower (stage 1 of this recipe) is reused
    qa_from: str | None = None  # a model folder that stages 1-2 of this recipe trained: only stage 3 runs
    place_scale: float | None = None  # the projector's row/column amplitude; None: the preset's (VLMConfig)
    time_scale: float | None = None  # the projector's frame amplitude; None: the preset's
    pool_cache: str | None = None  # a folder where encoded clip pools are kept and reused (encode_pool_cached)
    log: list = field(default_factory=list)


def shapesworld_vocabulary() -> list[str]:
    """Every word a ShapesWorld question, candidate or answer can use."""
    words = set(sw.SHAPES) | set(sw.COLOURS) | set(sw.SIZES) | set(sw.DIRECTIONS) | set(sw.QUADRANTS)
    words |= set(sw.NUMBER_WORDS) | set(sw.SHAPE_PLURALS.values())
    split_words = build_word_tokenizer([]).backend_tokenizer.pre_tokenizer.pre_tokenize_str
    for split in ("train", "samples"):
        for index in range(400):
            for question in sw.scene_and_questions(split, index)[1]:
                words.update(word for word, _ in split_words(question.text.lower()))
    return sorted(words)


def new_model(seed: int, place_scale: float | None = None, time_scale: float | None = None,
              vision: dict | None = None) -> VLM:
    """vidsieve-tiny at init; place_scale / time_scale override the preset's projector
    row-and-column / frame amplitudes, `vision` the tower config (default: the preset's with
    motion input, the recipe's tower since the sixth session; an older tower's config for
    --perception-from). The tower is built first, so its config also fixes the LM's init."""
    torch.manual_seed(seed)
    config = VLMConfig.from_name("vidsieve-tiny")
    config.vision = dict(vision) if vision is not None else {**config.vision, "motion_input": True}
    if place_scale is not None:
        config.place_scale = place_scale
    if time_scale is not None:
        config.time_scale = time_scale
    tokenizer = build_word_tokenizer(shapesworld_vocabulary())
    config.lm["vocab_size"] = 8 * math.ceil(len(tokenizer) / 8)
    return VLM(config, tokenizer)


# --- stage 1: perception ---------------------------------------------------------------------

class PerceptionHeads(nn.Module):
    """Per-patch heads on the tower's tokens: is an object here, and of a covered patch its
    colour, shape, size, dot colour (class 0: no dot), the quadrant of its centre and whether
    it holds that centre; behind a motion-input tower also its direction of motion and whether
    it appeared in this frame."""

    def __init__(self, width: int):
        super().__init__()
        self.object = nn.Linear(width, 1)
        self.colour = nn.Linear(width, len(sw.COLOURS))
        self.shape = nn.Linear(width, len(sw.SHAPES))
        self.size = nn.Linear(width, len(sw.SIZES))
        self.dot = nn.Linear(width, len(sw.COLOURS) + 1)
        self.quadrant = nn.Linear(width, len(sw.QUADRANTS))
        self.motion = nn.Linear(width, len(sw.DIRECTIONS))
        self.appears = nn.Linear(width, 2)  # class 0: it was here the frame before; 1: new
        self.centre = nn.Linear(width, 2)  # class 1: this patch holds its object's centre


# Per-patch targets: label 0 means "nothing to learn here" (no object, or no frame before),
# except for the dot, whose class 0 is "no dot" on a covered patch.
PATCH_TARGETS = ("colour", "shape", "size", "dot", "quadrant", "motion", "appears", "centre")
MOTION_TARGETS = frozenset({"motion", "appears"})  # need the frame before: motion-input towers only


# A dot flashes for 2-3 frames, so about 1.7% of covered patches show one: weight 20 gives them
# the share of the dot loss that weight 5 gave when dots lasted the object's life (~7%).
DOT_CLASS_WEIGHTS = torch.tensor([1.0] + [20.0] * len(sw.COLOURS))
APPEARS_CLASS_WEIGHTS = torch.tensor([1.0, 10.0])  # an object is new in about 1 of its 40 patch-frames
CENTRE_CLASS_WEIGHTS = torch.tensor([1.0, 4.0])  # one of an object's ~4-9 covered patches holds its centre


def patch_targets(scene: sw.Scene, object_ids: np.ndarray, patch_px: int) -> dict[str, np.ndarray]:
    """Per-patch labels [T, G, G] from the scene state: the object covering most of the patch
    (at least 1/16 of it) gives colour/shape/size; a visible dot gives the dot colour."""
    frames, size_px, _ = object_ids.shape
    grid = size_px // patch_px
    patches = object_ids.reshape(frames, grid, patch_px, grid, patch_px)
    counts = np.stack([(patches == obj.object_id).sum(axis=(2, 4)) for obj in scene.objects])  # [N, T, G, G]
    owner = counts.argmax(0)
    covered = counts.max(0) >= patch_px * patch_px // 16
    lookup = {
        "colour": [sw.COLOURS.index(o.colour) + 1 for o in scene.objects],
        "shape": [sw.SHAPES.index(o.shape) + 1 for o in scene.objects],
        "size": [sw.SIZES.index(o.size) + 1 for o in scene.objects],
    }
    targets = {name: np.where(covered, np.asarray(values)[owner], 0) for name, values in lookup.items()}
    # What changes over time, per object and frame [N, T]: quadrant of the centre, and (from
    # frame 1 on) the direction and whether the object is new since the frame before.
    quadrants = np.zeros((len(scene.objects), frames), np.int64)
    motion = np.zeros_like(quadrants)
    appears = np.zeros_like(quadrants)
    for obj in scene.objects:
        for t in np.flatnonzero(scene.present[obj.object_id]):
            quadrants[obj.object_id, t] = sw.QUADRANTS.index(sw.quadrant_of(scene, obj.object_id, int(t))) + 1
            if t == 0:
                continue
            was_here = bool(scene.present[obj.object_id, t - 1])
            appears[obj.object_id, t] = 1 if was_here else 2
            motion[obj.object_id, t] = sw.DIRECTIONS.index(obj.direction) + 1 if was_here else 0
    frame_of = np.arange(frames)[:, None, None]
    for name, table in (("quadrant", quadrants), ("motion", motion), ("appears", appears)):
        targets[name] = np.where(covered, table[owner, frame_of], 0)
    # The patch that holds its covering object's centre: one per visible object and frame, so
    # the tokens that hold one are what a count can count (COUNT_HEAD).
    centre = np.where(covered, 1, 0)
    for obj in scene.objects:
        for t in np.flatnonzero(scene.present[obj.object_id]):
            row, col = (int(v) // patch_px for v in scene.centres_px[obj.object_id, t][::-1])
            if 0 <= row < grid and 0 <= col < grid and covered[t, row, col] and owner[t, row, col] == obj.object_id:
                centre[t, row, col] = 2
    targets["centre"] = centre
    dot = np.zeros((frames, grid, grid), np.int64)
    for obj in scene.objects:
        if obj.dot_colour is None:
            continue
        for t in np.flatnonzero(scene.dot_visible[obj.object_id]):
            x_px, y_px = scene.centres_px[obj.object_id, t]
            dot[t, int(y_px) // patch_px, int(x_px) // patch_px] = sw.COLOURS.index(obj.dot_colour) + 1
    targets["dot"] = dot
    return targets


def perception_batch(first_index: int, clips: int, patch_px: int) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Frames (one [T, H, W, 3] array per clip) of training clips first_index.. and their
    per-patch targets [clips*T, G, G]."""
    frames, targets = [], {name: [] for name in PATCH_TARGETS}
    for index in range(first_index, first_index + clips):
        scene, _ = sw.scene_and_questions("train", index)
        rgb, object_ids = sw.render_with_labels(scene)
        frames.append(rgb)
        for name, value in patch_targets(scene, object_ids, patch_px).items():
            targets[name].append(value)
    return frames, {name: np.concatenate(values) for name, values in targets.items()}


def train_perception(model: VLM, config: TrainConfig, report: Callable[[str], None], pool=None) -> None:
    encoder = model.encoder.train()
    device = model.device
    heads = PerceptionHeads(encoder.width).to(device)
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.perception_lr, weight_decay=config.weight_decay)
    class_weights = {"dot": DOT_CLASS_WEIGHTS.to(device), "appears": APPEARS_CLASS_WEIGHTS.to(device),
                     "centre": CENTRE_CLASS_WEIGHTS.to(device)}
    names = [name for name in PATCH_TARGETS if encoder.motion_input or name not in MOTION_TARGETS]
    n = config.perception_clips_per_step
    batches = prefetch(pool, perception_batch, ((step * n, n, encoder.patch_size) for step in range(config.perception_steps)))
    correct = {name: 0 for name in names}
    counted = dict(correct)
    for step, (frames, targets) in enumerate(batches, start=1):
        tokens = encoder(encoder.preprocess_clips(frames))  # [B*T, G, G, width]
        labels = {name: torch.from_numpy(targets[name]).long().to(device) for name in names}
        logits = {name: getattr(heads, name)(tokens) for name in labels}
        # Most patches are background, and a loss averaged over all of them lets "nothing" win
        # (measured: shape stayed at chance). So: one objectness loss over every patch, and each
        # attribute over the covered patches that have a label (each with the same weight);
        # dots and new objects sit on few covered patches, so those classes weigh more.
        covered = labels["colour"] != 0
        losses = {"object": F.binary_cross_entropy_with_logits(heads.object(tokens).squeeze(-1), covered.float())}
        for name in names:
            labelled = covered if name == "dot" else labels[name] != 0
            target = labels[name] if name == "dot" else labels[name] - 1  # dot keeps class 0: "no dot"
            if labelled.any():
                losses[name] = F.cross_entropy(logits[name][labelled], target[labelled], weight=class_weights.get(name))
        loss = sum(losses.values())
        optimizer_step(optimizer, params, loss, config.perception_lr, step / config.perception_steps)
        for name, label in labels.items():  # accuracy on patches with something to predict
            mask = label != 0
            guess = logits[name].argmax(-1) + (0 if name == "dot" else 1)
            correct[name] += int((guess[mask] == label[mask]).sum())
            counted[name] += int(mask.sum())
        if step % 100 == 0 or step == config.perception_steps:
            hits = {name: correct[name] / max(counted[name], 1) for name in correct}
            report(f"perception step {step}/{config.perception_steps} loss {loss.item():.3f} accuracy since last report: "
                   + " ".join(f"{name} {value:.3f}" for name, value in hits.items()))
            config.log.append({"stage": "perception", "step": step, "loss": loss.item(),
                               **{f"{name}_acc": value for name, value in hits.items()}})
            correct, counted = {name: 0 for name in correct}, {name: 0 for name in correct}
    encoder.eval()


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, loss: torch.Tensor, peak_lr: float,
                   progress: float) -> None:
    """One update at the scheduled learning rate, gradients clipped to norm 1."""
    set_lr(optimizer, peak_lr, progress)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, peak: float, progress: float) -> None:
    """Linear warm-up over the first 3% then cosine decay to 5% of peak."""
    warm = min(1.0, progress / 0.03)
    lr = peak * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- stage 2: question answering ------------------------------------------------------------

QA_FIRST_CLIP = 10_000_000  # QA clips come from a different range of training seeds than perception's


@dataclass
class ClipPool:
    """Clips rendered once and put through the frozen tower once; QA steps draw from it.

    The tower is two thirds of a QA step's cost when clips are fresh, so encoding each clip
    once and revisiting it under different augmentations is several times cheaper."""

    features: torch.Tensor  # [clips, T, G, G, width] float16, on the model's device
    questions: list[list[sw.Question]]
    owners: torch.Tensor  # [clips, T, Gm, Gm] uint8: which objects each merged token shows (bit i: object i)
    facts: torch.Tensor | None = None  # [clips, MAX_OBJECTS, FACT_COUNT + 3T] int8: `object_facts` of each clip

    def __len__(self) -> int:
        return len(self.questions)


# What the object head's output is taught to name about the object it found (ObjectReadout):
# each a class index into the vocabulary beside it, -1 where it does not apply.
FACTS = (("colour", sw.COLOURS), ("shape", sw.SHAPES), ("size", sw.SIZES),
         ("dot", (None, *sw.COLOURS)), ("direction", sw.DIRECTIONS))
FACT_COUNT = len(FACTS)
DOT_FACT = [name for name, _ in FACTS].index("dot")
MAX_OBJECTS = 8  # owners keep one bit per object in a uint8


def object_facts(scene: sw.Scene, block_px: int) -> np.ndarray:
    """[MAX_OBJECTS, FACT_COUNT + 3T] int8: per object, the index of its colour, shape, size,
    dot colour (0: none) and direction, then its quadrant (index into QUADRANTS) in each frame,
    then the block_px square (row * grid + column) that holds its centre in each frame (-1
    where it is absent), then 1 in each frame where its whole dot shows (0 elsewhere). Rows
    past the scene's objects are -1."""
    frames = scene.config.frame_count
    grid = scene.config.frame_size_px // block_px
    facts = np.full((MAX_OBJECTS, FACT_COUNT + 3 * frames), -1, np.int8)
    for obj in scene.objects:
        facts[obj.object_id, :FACT_COUNT] = [values.index(getattr(obj, "dot_colour" if name == "dot" else name))
                                             for name, values in FACTS]
        for t in np.flatnonzero(scene.present[obj.object_id]):
            facts[obj.object_id, FACT_COUNT + t] = sw.QUADRANTS.index(sw.quadrant_of(scene, obj.object_id, int(t)))
            x_px, y_px = np.clip(scene.centres_px[obj.object_id, t], 0, scene.config.frame_size_px - 1)
            facts[obj.object_id, FACT_COUNT + frames + t] = int(y_px) // block_px * grid + int(x_px) // block_px
        facts[obj.object_id, FACT_COUNT + 2 * frames:] = scene.dot_visible[obj.object_id]
    return facts


def fact_frames(facts: torch.Tensor) -> int:
    """T, the frames of the clip an `object_facts` array (or one row of it) describes."""
    return (facts.shape[-1] - FACT_COUNT) // 3


def kept_cells(kept: VisualTokens) -> torch.Tensor:
    """[len(kept)] long: each kept token's frame * (squares per frame) + its square, the
    numbering of `object_facts`' centre squares offset by frame."""
    grid = kept.grid_thw[2]
    return (kept.frame_index.cpu() * kept.grid_thw[1] * grid + kept.grid_rc[:, 0].cpu() * grid
            + kept.grid_rc[:, 1].cpu())


def dot_is_kept(facts: torch.Tensor, object_id: int, kept: VisualTokens) -> bool:
    """Whether `kept` holds the token at the object's centre in a frame where its whole dot
    shows. A dot flashes for 2-3 frames, so dropped frames or tokens often lose it."""
    frames = fact_frames(facts)
    shown = torch.nonzero(facts[object_id, FACT_COUNT + 2 * frames:] == 1)[:, 0]
    per_frame = kept.grid_thw[1] * kept.grid_thw[2]
    wanted = [int(t) * per_frame + int(facts[object_id, FACT_COUNT + frames + t]) for t in shown]
    return bool(torch.isin(kept_cells(kept), torch.tensor(wanted, dtype=torch.long)).any())


def readout_targets(facts: torch.Tensor, question: sw.Question, kept: VisualTokens) -> torch.Tensor | None:
    """[FACT_COUNT + 1] long: what ObjectReadout should name for a question about one object
    (its facts, then its quadrant in the question's frame if it names one; -100: not taught),
    from `object_facts` of its clip. A dot's colour is taught only where `kept` shows the dot.
    None for a question about several objects."""
    if len(question.object_ids) != 1:
        return None
    object_id = question.object_ids[0]
    row = facts[object_id].long()
    quadrant = row[FACT_COUNT + question.frame_index] if question.frame_index is not None else torch.tensor(-1)
    targets = torch.cat([row[:FACT_COUNT], quadrant[None]])
    if targets[DOT_FACT] > 0 and not dot_is_kept(facts, object_id, kept):
        targets[DOT_FACT] = -100
    return targets.masked_fill(targets < 0, -100)


def count_targets(facts: torch.Tensor, question: sw.Question, kept: VisualTokens,
                  present: torch.Tensor | None = None) -> torch.Tensor | None:
    """[len(kept)] float for a counting question: per kept token, how many counted objects it
    stands for; it sums to the count. An object's token is the one holding its centre in the
    frame the question names (a count at the start or end: stage 2's `moment_counts`), else in
    the first frame it is present in (where the tower marks it new). Where a compressor dropped that
    token, and `present` (`token_owners` of `kept`) is given, it is the object's first kept token
    in that frame, else the same in its next frames: a model that only counts whole clips breaks
    under random dropping (13 points lost at 50% kept, run Q). Two centres can share a 32 px
    token. None for other questions, or when one counted object has no kept token left (the
    count head is then not taught)."""
    if question.type != "counting":
        return None
    frames = fact_frames(facts)
    per_frame = kept.grid_thw[1] * kept.grid_thw[2]
    cell, frame_of = kept_cells(kept), kept.frame_index.cpu()
    weights = torch.zeros(len(kept))
    for object_id in question.object_ids:
        centres = facts[object_id, FACT_COUNT + frames:FACT_COUNT + 2 * frames]
        shown = torch.nonzero(centres >= 0)[:, 0].tolist() if question.frame_index is None else [question.frame_index]
        token = None
        for frame in shown:
            centre = int(centres[frame])  # -1 where the object's centre is not its own token then
            hits = torch.nonzero(cell == frame * per_frame + centre)[:, 0] if centre >= 0 else cell[:0]
            if len(hits) == 0 and present is not None:
                hits = torch.nonzero((((present >> object_id) & 1) != 0) & (frame_of == frame))[:, 0]
            if len(hits):
                token = int(hits[0])
                break
            if present is None:
                return None
        if token is None:
            return None
        weights[token] += 1
    return weights


def object_reps(facts: torch.Tensor, kept: VisualTokens, present: torch.Tensor) -> torch.Tensor:
    """[MAX_OBJECTS, T] long: the kept token that stands for each object in each frame, -1
    where none does. It is the token holding the object's centre if that was kept, else the
    first kept token that covers the object in that frame (`present`, `token_owners` of
    `kept`): the rule `count_targets` picks an object's token by."""
    frames = fact_frames(facts)
    per_frame = kept.grid_thw[1] * kept.grid_thw[2]
    cell, frame_of = kept_cells(kept), kept.frame_index.cpu()
    reps = torch.full((facts.shape[0], frames), -1, dtype=torch.long)
    for object_id in range(facts.shape[0]):
        covers = ((present >> object_id) & 1) != 0
        for frame in torch.nonzero(facts[object_id, FACT_COUNT + frames:FACT_COUNT + 2 * frames] >= 0)[:, 0].tolist():
            centre = frame * per_frame + int(facts[object_id, FACT_COUNT + frames + frame])
            hits = torch.nonzero(cell == centre)[:, 0]
            if len(hits) == 0:
                hits = torch.nonzero(covers & (frame_of == frame))[:, 0]
            if len(hits):
                reps[object_id, frame] = hits[0]
    return reps


def identity_targets(facts: torch.Tensor, kept: VisualTokens, present: torch.Tensor) -> torch.Tensor:
    """[len(kept), 1 + len(kept)] bool: what the identity head (IDENTITY_HEAD) of each kept token
    that stands for an object (`object_reps`) is taught to attend to. Column 0 is the sink:
    the token is the first to stand for one of its objects. Otherwise columns 1 + j, the
    earlier kept tokens j that stand for its objects: it has been seen before. Rows of
    tokens that stand for no object are all False (not taught)."""
    reps = object_reps(facts, kept, present)
    targets = torch.zeros(len(kept), 1 + len(kept), dtype=torch.bool)
    for token in torch.unique(reps[reps >= 0]).tolist():
        objects, frames = torch.nonzero(reps == token, as_tuple=True)
        earlier = [reps[o, :f][reps[o, :f] >= 0] for o, f in zip(objects.tolist(), frames.tolist())]
        if any(len(seen) == 0 for seen in earlier):
            targets[token, 0] = True
        else:
            targets[token, 1 + torch.cat(earlier)] = True
    return targets


def order_is_kept(question: sw.Question, kept: VisualTokens, present: torch.Tensor) -> bool:
    """Whether the kept tokens show a temporal-order question's answer: every option is in
    view, and its first frame in view (its last, for "disappears") puts the winner strictly
    ahead of the others. `present` is `token_owners` of `kept`. A brief winner that falls
    between kept frames can only be guessed, and taught as an answer it teaches the model to
    pick the option it cannot see: run Q chose it 34 times in 45 with one frame in four."""
    event_frame, earliest_wins = sw.temporal_event(question)
    frame_of = kept.frame_index.cpu()
    seen = []
    for object_id in question.object_ids:
        frames = frame_of[((present >> object_id) & 1) != 0]
        if len(frames) == 0:
            return False
        seen.append(int(frames.min() if event_frame == "first_frame" else frames.max()))
    winner, others = seen[0], seen[1:]
    return all(winner < other if earliest_wins else winner > other for other in others)


def render_clip(split: str, index: int, block_px: int,
                moment_counts: bool = False) -> tuple[np.ndarray, list[sw.Question], np.ndarray]:
    """Frames, questions (`moment_counts`: see `sw.make_questions`), and which objects cover at
    least 16 px of each block_px square."""
    scene, questions = sw.scene_and_questions(split, index, moment_counts=moment_counts)
    frames, object_ids = sw.render_with_labels(scene)
    t, size, _ = object_ids.shape
    blocks = object_ids.reshape(t, size // block_px, block_px, size // block_px, block_px)
    owners = np.zeros((t, size // block_px, size // block_px), np.uint8)
    for obj in scene.objects:
        covered = (blocks == obj.object_id).sum(axis=(2, 4)) >= 16
        owners |= covered.astype(np.uint8) << obj.object_id
    return frames, questions, owners


@torch.no_grad()
def encode_pool(model: VLM, split: str, first_index: int, clips: int, pool=None, chunk: int = 32,
                moment_counts: bool = False) -> ClipPool:
    features, questions, owners, pending = None, [], [], []
    block_px = model.encoder.patch_size * model.projector.merge
    jobs = ((split, first_index + i, block_px, moment_counts) for i in range(clips))
    for done, (frames, clip_questions, clip_owners) in enumerate(prefetch(pool, render_clip, jobs), start=1):
        pending.append(frames)
        questions.append(clip_questions)
        owners.append(clip_owners)
        if len(pending) == chunk or done == clips:
            encoded = model.encoder(model.encoder.preprocess_clips(pending))
            encoded = encoded.view(len(pending), -1, *encoded.shape[1:]).half()  # [B, T, G, G, width]
            if features is None:
                features = torch.empty((clips, *encoded.shape[1:]), dtype=torch.float16, device=encoded.device)
            features[done - len(pending):done] = encoded
            pending = []
    return ClipPool(features, questions, torch.from_numpy(np.stack(owners)),
                    pool_facts(split, first_index, clips, block_px))


def pool_facts(split: str, first_index: int, clips: int, block_px: int) -> torch.Tensor:
    """[clips, MAX_OBJECTS, FACT_COUNT + 3T] int8: `object_facts` of each clip (scenes only, no
    rendering: ~3 ms a clip)."""
    return torch.from_numpy(np.stack([object_facts(sw.scene_and_questions(split, first_index + i)[0], block_px)
                                      for i in range(clips)]))


def encode_pool_cached(model: VLM, split: str, first_index: int, clips: int, pool=None,
                       cache: str | Path | None = None, moment_counts: bool = False) -> ClipPool:
    """`encode_pool`, kept in folder `cache` (if given) under a name made of the tower's weights,
    the projector's merge, the clips (split, first index, count), ShapesWorld's generator
    version and `moment_counts`: the next run on the same tower loads it instead of
    rendering and encoding again (12,000 clips: ~5-11 minutes on 2 cores, ~2.4 GB on disk)."""
    if cache is None:
        return encode_pool(model, split, first_index, clips, pool, moment_counts=moment_counts)
    digest = hashlib.sha256()
    for name, value in sorted(model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().float().numpy().tobytes())
    digest.update(f"{split}/{first_index}/{clips}/{model.projector.merge}/{sw.GENERATOR_VERSION}".encode())
    if moment_counts:
        digest.update(b"/moment-counts")
    path = Path(cache) / f"pool-{split}-{clips}-{digest.hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return ClipPool(saved["features"].to(model.device), saved["questions"], saved["owners"],
                        pool_facts(split, first_index, clips, model.encoder.patch_size * model.projector.merge))
    # (facts are not kept in the file: pools saved before they existed load too)
    encoded = encode_pool(model, split, first_index, clips, pool, moment_counts=moment_counts)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"features": encoded.features.cpu(), "questions": encoded.questions, "owners": encoded.owners}, partial)
    partial.replace(path)  # a run stopped while saving leaves no half-written pool behind
    return encoded


def packed_from_pool(model: VLM, pool: ClipPool, index: int, spec: CompressorSpec, seed: int,
                     frames: int | None = None, *, every_question: bool = False,
                     whole_only_types: frozenset = frozenset(), identity: bool = False) -> PackedClip | None:
    """Clip `index` of the pool through the projector and compressor `spec`, its questions packed.

    With `frames` (the QA curriculum, see CURRICULUM), only that many random frames of the clip
    are kept, uncompressed, and only the questions answerable from them: a frame-local type,
    its frame among those kept, and its object visible in them. Either way a fine-detail
    question is asked only where the kept tokens show its dot (it flashes for 2-3 frames, so a
    question without it would teach a guess), and a temporal-order question only where they
    show its order (`order_is_kept`), unless `every_question` (evaluation). Questions of
    `whole_only_types` are asked only if every token was kept. `identity`: the clip's
    `identity_targets` too. None when no question is left."""
    tokens = pool_tokens(model, pool, index)
    questions = pool.questions[index]
    cut = frames is not None and frames < tokens.num_frames
    if cut:
        chosen = torch.tensor(random.Random(seed).sample(range(tokens.num_frames), frames))
        kept = tokens.select(torch.isin(tokens.frame_index.cpu(), chosen))
    else:
        kept = spec.compressor.compress(tokens, CompressionContext(budget=spec.budget, seed=seed, model=model))
    masks = binding_masks(kept, pool.owners[index], questions)
    looks = look_masks(kept, pool.owners[index], questions)
    local = FRAME_LOCAL_TYPES | (MOTION_LOCAL_TYPES if model.encoder.motion_input else frozenset())
    facts = pool.facts[index] if pool.facts is not None else None
    present = token_owners(kept, pool.owners[index])
    answerable = [i for i, (q, m) in enumerate(zip(questions, masks))
                  if (q.type not in whole_only_types or len(kept) == len(tokens))
                  and (not cut or (q.type in local and bool(m.any())))
                  and (every_question or q.type != "fine_detail" or facts is None
                       or dot_is_kept(facts, q.object_ids[0], kept))
                  and (every_question or q.type != "temporal_order" or order_is_kept(q, kept, present))]
    if not answerable:
        return None
    questions = [questions[i] for i in answerable]
    masks, looks = [masks[i] for i in answerable], [looks[i] for i in answerable]
    eos = model.tokenizer.eos_token_id
    answers = [model.tokenizer(q.answer, add_special_tokens=False).input_ids + [eos] for q in questions]
    clip = pack_clip(model, kept, tokens.span_length, [q.text for q in questions], answers, masks, looks)
    if pool.facts is not None:
        clip.readout_targets = [readout_targets(pool.facts[index], q, kept) for q in questions]
        clip.count_targets = [count_targets(pool.facts[index], q, kept, present) for q in questions]
        if identity:
            clip.identity_targets = identity_targets(pool.facts[index], kept, present)
    return clip


def pool_tokens(model: VLM, pool: ClipPool, index: int) -> VisualTokens:
    """Every visual token of clip `index` of the pool: its tower features through the projector."""
    features = pool.features[index].float()
    return VisualTokens.from_grid(model.projector(features), np.arange(len(features)) / sw.DEFAULT_CONFIG.fps)


def model_on_tower(folder: str | Path, seed: int = 0, place_scale: float | None = None,
                   time_scale: float | None = None) -> VLM:
    """A fresh model (projector + LM at init) on the frozen tower of `folder`, a model that
    stage 1 of this recipe trained: where QA training and the probes start. Only the tower (its
    config and weights) is read, so a tower stays usable when the projector, LM or preset changes."""
    vision = json.loads((Path(folder) / "config.json").read_text())["vision"]
    model = new_model(seed, place_scale, time_scale, vision)
    weights = load_file(Path(folder) / "model.safetensors")
    tower = {name.removeprefix("encoder."): value for name, value in weights.items() if name.startswith("encoder.")}
    model.encoder.load_state_dict(tower)
    model.encoder.eval().requires_grad_(False)
    return model


def probe_parser(prog: str, doc: str, *, steps: int, clips_per_step: int, train_clips: int,
                 val_clips: int) -> argparse.ArgumentParser:
    """The options every QA probe on a stage-1 tower shares (eval.probe_readout, eval.probe_curriculum)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--tower", required=True, help="a model folder whose tower stage 1 trained")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--clips-per-step", type=int, default=clips_per_step)
    parser.add_argument("--train-clips", type=int, default=train_clips)
    parser.add_argument("--val-clips", type=int, default=val_clips)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def start_probe(args: argparse.Namespace) -> tuple[VLM, ClipPool, ClipPool, torch.optim.Optimizer, list]:
    """(model, train pool, val pool, optimizer, its params) for a probe parsed by `probe_parser`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = model_on_tower(args.tower)
    train = encode_pool(model, "train", QA_FIRST_CLIP, args.train_clips)
    val = encode_pool(model, "val", 0, args.val_clips)
    return (model, train, val, *qa_optimizer(model, args.lr))


def qa_optimizer(model: VLM, lr: float, weight_decay: float = 0.01,
                 extra: nn.Module | None = None) -> tuple[torch.optim.Optimizer, list]:
    """AdamW over what the QA stage trains (projector and LM, and `extra`, a training-only
    head such as ObjectReadout), and that parameter list."""
    params = list(model.projector.parameters()) + list(model.lm.parameters())
    params += list(extra.parameters()) if extra is not None else []
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), params


def train_qa(model: VLM, config: TrainConfig, report: Callable[[str], None], pool=None,
             checkpoint: Callable[[int], None] | None = None) -> tuple[ClipPool, ClipPool]:
    """Stage 2: projector and LM on the frozen tower; returns the (train, val) pools, the
    training clips asking whole-clip counts only (what stage 3 is taught)."""
    train, val = encode_pools(model, config, report, pool, moment_counts=config.moment_counts)
    qa_loop(model, config, train, val, stage="qa", steps=config.qa_steps, lr=config.qa_lr,
            augmentations=AUGMENTATIONS, rng=random.Random(config.seed), curriculum=config.curriculum,
            report=report, checkpoint=checkpoint)
    if config.moment_counts:
        whole_clip = [sw.scene_and_questions("train", QA_FIRST_CLIP + i)[1] for i in range(len(train))]
        train = replace(train, questions=whole_clip)
    return train, val


def train_robust(model: VLM, config: TrainConfig, report: Callable[[str], None],
                 pools: tuple[ClipPool, ClipPool], checkpoint: Callable[[int], None] | None = None) -> None:
    """Stage 3: `config.robust_steps` more QA steps on whole clips, at a lower peak learning rate
    with a fresh optimizer, drawing ROBUST_AUGMENTATIONS, and ROBUST_WHOLE_ONLY_TYPES only where
    every token is kept, teaching the identity head which earlier kept tokens show the same
    object (`identity_targets`, at `config.identity_weight`). It starts only from stage 2's
    weights and seeds its own draws, so it continues a run in memory or a saved model
    (`--qa-from`) the same way."""
    train, val = pools
    qa_loop(model, config, train, val, stage="robust", steps=config.robust_steps, lr=config.robust_lr,
            augmentations=ROBUST_AUGMENTATIONS, rng=random.Random(f"robust/{config.seed}"), curriculum=(),
            whole_only_types=ROBUST_WHOLE_ONLY_TYPES, identity_weight=config.identity_weight,
            extra_eval=ROBUST_EVAL_SPEC, report=report, checkpoint=checkpoint)


def encode_pools(model: VLM, config: TrainConfig, report: Callable[[str], None], pool=None,
                 moment_counts: bool = False) -> tuple[ClipPool, ClipPool]:
    """The QA (train, val) pools through the frozen tower (`encode_pool_cached`); with
    `moment_counts` the training clips ask v2's counts at a moment too (validation never)."""
    model.encoder.requires_grad_(False).eval()
    report(f"encoding {config.qa_pool_clips} training clips and {config.eval_clips} validation clips with the frozen tower")
    started = time.monotonic()
    train = encode_pool_cached(model, "train", QA_FIRST_CLIP, config.qa_pool_clips, pool, config.pool_cache,
                               moment_counts)
    val = encode_pool_cached(model, "val", 0, config.eval_clips, pool, config.pool_cache)
    report(f"encoded in {time.monotonic() - started:.0f} s")
    return train, val


def qa_loop(model: VLM, config: TrainConfig, train: ClipPool, val: ClipPool, *, stage: str, steps: int, lr: float,
            augmentations: tuple, rng: random.Random, curriculum: tuple, report: Callable[[str], None],
            checkpoint: Callable[[int], None] | None = None, whole_only_types: frozenset = frozenset(),
            identity_weight: float = 0.0, extra_eval: str | None = None) -> None:
    """`steps` AdamW steps (warm-up, cosine to 5% of `lr`) on packed clips of `train`, each
    through a compressor drawn from `augmentations`; validation on `val` every
    `config.eval_every` steps (also under `extra_eval`, a compressor spec, if given)."""
    readout = None
    if config.binding and config.readout_weight > 0:
        torch.manual_seed(config.seed)  # the same init whether stage 1 ran here or --perception-from
        readout = ObjectReadout(binding_attention(model).head_dim).to(config.device)
    optimizer, params = qa_optimizer(model, lr, config.weight_decay, readout)
    specs = [parse_spec(text) for text, _ in augmentations]
    weights = [weight for _, weight in augmentations]
    order: list[int] = []
    seen = 0
    model.lm.train()
    for step in range(1, steps + 1):
        while len(order) < config.qa_clips_per_step:  # epochs over the pool, each in a fresh order
            order += rng.sample(range(len(train)), len(train))
        chosen, order = order[:config.qa_clips_per_step], order[config.qa_clips_per_step:]
        frames = frames_at(curriculum, step)
        packed = [packed_from_pool(model, train, i, rng.choices(specs, weights)[0], rng.randrange(1 << 30), frames,
                                   whole_only_types=whole_only_types, identity=identity_weight > 0)
                  for i in chosen]
        packed = [clip for clip in packed if clip is not None]
        seen += sum(len(clip.first_answer_at) for clip in packed)
        parts: dict[str, float] = {}
        loss, accuracy = packed_answer_loss(model, packed, binding=config.binding, look_weight=config.look_weight,
                                            query_weight=config.query_weight, readout=readout,
                                            readout_weight=config.readout_weight, count_weight=config.count_weight,
                                            identity_weight=identity_weight, parts=parts)
        optimizer_step(optimizer, params, loss, lr, step / steps)
        if step % 25 == 0:
            epoch = step * config.qa_clips_per_step / len(train)
            report(f"{stage} step {step}/{steps} frames {frames or 'all'} epoch {epoch:.2f} "
                   f"questions {seen} loss {loss.item():.3f} first-token acc {accuracy:.3f} "
                   + " ".join(f"{kind} {value:.3f}" for kind, value in parts.items()))
            config.log.append({"stage": stage, "step": step, "questions": seen, "loss": loss.item(),
                               "train_acc": accuracy, **parts})
        if step % config.eval_every == 0 or step == steps:
            model.lm.eval()
            result = packed_eval(model, val)
            if extra_eval is not None:
                result[extra_eval] = packed_eval(model, val, extra_eval)
            model.lm.train()
            report(f"{stage} eval at step {step}: {json.dumps(result)}")
            config.log.append({"stage": f"{stage}-eval", "step": step, **result})
            if checkpoint is not None:
                checkpoint(step)
    model.lm.eval()


def frames_at(curriculum, step: int) -> int | None:
    """Frames per clip at QA step `step` (1-based) of `curriculum`; None once it is over."""
    for steps, frames in curriculum:
        if step <= steps:
            return frames
        step -= steps
    return None


@torch.no_grad()
def packed_eval(model: VLM, pool: ClipPool, spec: str = "none", batch: int = 24) -> dict:
    """Teacher-forced first-token accuracy per question type (answers are one word, so this
    is the greedy answer's accuracy up to stopping after it; the harness checks that)."""
    compressor = parse_spec(spec)
    hits: dict[str, list[int]] = {}
    for start in range(0, len(pool), batch):
        indices = range(start, min(start + batch, len(pool)))
        packed = [packed_from_pool(model, pool, i, compressor, seed=i, every_question=True) for i in indices]
        logits, _ = packed_logits(model, packed)
        for row, (clip, i) in enumerate(zip(packed, indices)):
            predicted = logits[row, clip.first_answer_at].argmax(-1).tolist()
            for question, guess, truth in zip(pool.questions[i], predicted, clip.first_answer_ids):
                hits.setdefault(question.type, []).append(int(guess == truth))
    per_type = {name: round(sum(v) / len(v), 3) for name, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return {"overall": round(overall, 3), **per_type}


@dataclass
class PackedClip:
    """One clip's visual tokens once, then every question and its answer as its own segment.

    Segment 0 is the shared prefix (prompt start + visual tokens); segment i >= 1 is question
    i followed by its teacher-forced answer, attending to segment 0 and to itself only, at
    the positions it would have alone. One clip's questions then cost one pass over its
    visual tokens instead of one per question, with the same loss (tested).
    """

    embeds: torch.Tensor  # [L, D]
    positions: torch.Tensor  # [L]
    labels: torch.Tensor  # [L], -100 where nothing is predicted
    segments: torch.Tensor  # [L]
    first_answer_at: list[int]  # index of the position that predicts each answer's first token
    first_answer_ids: list[int]
    visual_span: tuple[int, int] = (0, 0)  # [start, end) of the visual tokens
    binding_targets: list[torch.Tensor | None] = field(default_factory=list)  # per question: [visual] bool
    look_targets: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # (first, last)
    # per question: (start of its segment, [at + 1 - start] bool over its tokens up to the answer)
    naming_targets: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    readout_targets: list[torch.Tensor | None] = field(default_factory=list)  # per question: see `readout_targets`
    count_targets: list[torch.Tensor | None] = field(default_factory=list)  # per question: see `count_targets`
    identity_targets: torch.Tensor | None = None  # [visual, 1 + visual] bool: see `identity_targets`


def pack_clip(model: VLM, kept: VisualTokens, span_length: int, questions: list[str],
              answers: list[list[int]], binding_targets: list[torch.Tensor | None] | None = None,
              look_targets: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> PackedClip:
    prefix_ids, _ = model._prompt_ids("")
    embeds, positions, _, _ = model._layout(prefix_ids, kept, torch.arange(len(prefix_ids)))
    after_video = model.text_position(len(prefix_ids), len(prefix_ids) + span_length, frame_span(kept))  # as `prepare`
    parts, labels, segments = [(embeds, positions)], [torch.full((len(embeds),), -100)], [torch.zeros(len(embeds))]
    offset, first_at, naming = len(embeds), [], []
    naming_ids = naming_token_ids(model.tokenizer)
    for segment, (question, answer) in enumerate(zip(questions, answers), start=1):
        _, suffix_ids = model._prompt_ids(question)
        naming.append((offset, torch.isin(suffix_ids, naming_ids)))
        ids = torch.cat([suffix_ids, torch.tensor(answer[:-1], dtype=torch.long)])
        parts.append((model.runner.embed(ids), after_video + torch.arange(len(ids))))
        labels.append(torch.cat([torch.full((len(suffix_ids) - 1,), -100), torch.tensor(answer)]))
        segments.append(torch.full((len(ids),), segment))
        first_at.append(offset + len(suffix_ids) - 1)
        offset += len(ids)
    return PackedClip(torch.cat([e for e, _ in parts]), torch.cat([p for _, p in parts]), torch.cat(labels),
                      torch.cat(segments).long(), first_at, [a[0] for a in answers],
                      (len(prefix_ids), len(prefix_ids) + len(kept)), binding_targets or [None] * len(questions),
                      look_targets or [None] * len(questions), naming)


def naming_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the words that name an object in a question: colours, shapes, sizes, directions.
    (Run L added "start", "end", "appears", "disappears", "first", "last": no better on
    position; docs/TRAINING.md.)"""
    words = {*sw.COLOURS, *sw.SHAPES, *sw.SHAPE_PLURALS.values(), *sw.SIZES, *sw.DIRECTIONS}
    vocabulary = tokenizer.get_vocab()
    return torch.tensor(sorted(vocabulary[word] for word in words if word in vocabulary))


def packed_logits(model: VLM, clips: list[PackedClip], capture: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, L, V] and labels [B, L] of a padded batch of packed clips. With `capture`,
    the inputs of the attention of layers QUERY_LAYER, BINDING_LAYER and IDENTITY_LAYER (normed
    hidden states, rotary cos and sin) are stored in it, `capture[layer] = (hidden, (cos, sin))`,
    for `binding_loss`."""
    longest = max(len(c.embeds) for c in clips)
    batch, width = len(clips), clips[0].embeds.shape[1]
    device = clips[0].embeds.device
    embeds = torch.zeros(batch, longest, width, device=device)
    positions = torch.zeros(batch, longest, dtype=torch.long)
    labels = torch.full((batch, longest), -100)
    segments = torch.full((batch, longest), -1)  # -1: padding
    for row, clip in enumerate(clips):
        n = len(clip.embeds)
        embeds[row, :n], positions[row, :n], labels[row, :n], segments[row, :n] = (
            clip.embeds, clip.positions, clip.labels, clip.segments)
    query, key = segments[:, :, None], segments[:, None, :]  # [B, L, 1], [B, 1, L]
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()
    allowed = causal & (key != -1) & ((key == 0) | (key == query))
    allowed |= torch.eye(longest, dtype=torch.bool)  # padding rows see themselves (no empty softmax)
    handles = []
    if capture is not None:
        def keeper(layer: int):
            def keep_inputs(module, args, kwargs):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                capture[layer] = (hidden, kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1])
            return keep_inputs
        for layer in {QUERY_LAYER, BINDING_LAYER, IDENTITY_LAYER}:
            handles.append(model.lm.model.layers[layer].self_attn.register_forward_pre_hook(keeper(layer),
                                                                                            with_kwargs=True))
    try:
        logits = model.lm(inputs_embeds=embeds, attention_mask=allowed[:, None].to(device),
                          position_ids=positions.to(device)).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, labels.to(device)


# --- binding supervision ----------------------------------------------------------------------
#
# A small LM learning QA from scratch sits for thousands of steps at the answer prior: to answer
# "what colour is the big circle?" its last position must attend to the tokens of that one
# object among 256, and until some head does, the answer loss gives the attention almost no
# gradient (measured: the same plateau with perfect one-hot "oracle" visual features). The
# scene state says which tokens hold the object a question is about, so heads of layer
# BINDING_LAYER, at the position that predicts the answer, are told where to put their
# attention mass (cross-entropy of the summed probability on the targets):
#
# - OBJECT_HEAD: every token of the question's objects (in its frame, if it names one);
# - FIRST_LOOK_HEAD / LAST_LOOK_HEAD: for a question about one object, its tokens in the
#   first / the last kept frame that shows it.
#
# One head over all of an object's tokens reads its colour and shape but averages its place
# over the clip: where it moves, where it was when it appeared, cannot be read from a mean.
# Two looks, one early and one late, can: with only the object's tokens in view, motion went
# from chance to 42% in 600 probe steps with them (docs/TRAINING.md, "Position and motion").
# They also slow attribute binding, so they are off unless TrainConfig.look_weight > 0.
#
# - QUERY_HEAD of QUERY_LAYER: the question's own words that name its objects (colours,
#   shapes, sizes, directions). The object head can only find "the white object" once the
#   answer position holds "white", and that gather is a circuit of its own; in runs whose
#   object head never got much of its mass onto the objects, this is the step that had not
#   formed: with it, run E's recipe binds for every seed tried (docs/TRAINING.md, runs J).
#
# - ObjectReadout: finding the object is not reading it. A linear readout of the object
#   head's output (its attention-weighted values) is taught to name the found object's colour,
#   shape, size, dot, direction and, for a question that names a moment, its quadrant then.
#   Run N's object head found the object of a position or motion question (mass 0.80 and
#   0.97), but a linear probe read the quadrant and direction from its output only 41% and
#   34% of the time (`eval.probe_heads`), and the model answered at chance: the answer loss alone
#   had not made the head's values carry what the tokens hold (docs/TRAINING.md, run O).
#
# - COUNT_HEAD: attention averages, so a head that finds every counted object cannot say
#   how many it found (run O: counting 66% on the test split, off by one when wrong, every
#   other type 87-98%). The transformer way to count is a sink: a head that puts equal
#   weight on one fixed token and on one token per counted item hands the layers above
#   sink/(n + 1) of the sink's value. So for counting questions this head is taught exactly
#   that distribution (cross-entropy to it) over the last prompt token before the video (the
#   sink) and, per counted object, the token that holds its centre (the tower's `centre`
#   target) in the frame the question names, else in its first frame (a token holding two
#   centres twice the weight); the readout also names the count from the head's output.
#
# - IDENTITY_HEAD of IDENTITY_LAYER (stage 3): the count head must find one token per object,
#   and with every token kept the tower's `appears` mark says which (the object's token in its
#   first frame). A compressor drops that token as often as any other; what is left is the
#   same object in several frames, and run R over-counted it (at 25% kept, 16 of the 21 wrong
#   counts where every counted object kept a token were too high). So at each kept token that
#   stands for an object in its frame (`object_reps`), this head is taught to attend to the
#   earlier kept tokens of the same object, or to the sink where there are none
#   (`identity_targets`): the layer above then reads "first seen" from a head's output, as
#   the count head needs. Objects differ in colour, shape or size, so the head can match them.
#
# The heads' weights and everything below them learn; at inference nothing changes (the
# readout is a training-only head, not saved).

BINDING_LAYER = 1
BINDING_WEIGHT = 4.0  # the object head; the look heads' weight is TrainConfig.look_weight
OBJECT_HEAD, FIRST_LOOK_HEAD, LAST_LOOK_HEAD = 0, 2, 3  # query heads; 2 and 3 share a KV head
COUNT_HEAD = FIRST_LOOK_HEAD  # its own keys and values (not the object head's); so the look heads or it
QUERY_LAYER, QUERY_HEAD = 0, 0  # the naming head; its weight is TrainConfig.query_weight
IDENTITY_LAYER, IDENTITY_HEAD = 0, 2  # stage 3's identity head: its own KV head (the naming head's is 0)


def binding_attention(model: VLM) -> nn.Module:
    return model.lm.model.layers[BINDING_LAYER].self_attn


class ObjectReadout(nn.Module):
    """Linear heads from the object head's output to the facts of the object it found (FACTS,
    then the quadrant), and from the count head's output to the count: trained beside the
    answer loss, dropped afterwards."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.sizes = [len(values) for _, values in FACTS] + [len(sw.QUADRANTS)]
        self.linear = nn.Linear(head_dim, sum(self.sizes))
        self.count = nn.Linear(head_dim, len(sw.NUMBER_WORDS))  # from the count head's output

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Mean over facts (each with at least one target) of the cross-entropy over the
        questions; outputs [Q, head_dim], targets [Q, len(sizes)] (-100: not taught)."""
        logits = self.linear(outputs).split(self.sizes, dim=-1)
        terms = [F.cross_entropy(part, targets[:, i]) for i, part in enumerate(logits) if (targets[:, i] >= 0).any()]
        return torch.stack(terms).mean() if terms else None


def binding_loss(model: VLM, clips: list[PackedClip], capture: dict, looks: bool = True,
                 query: bool = False, readout: ObjectReadout | None = None,
                 count: bool = False, identity: bool = False) -> dict[str, torch.Tensor]:
    """{"object": ..., "look": ..., "query": ..., "readout": ...}: the mean over (question,
    supervised head) pairs with targets of -log(attention mass of the head on the target
    tokens). The object and look heads' softmax is taken over the clip's visual tokens, the
    naming head's over the question's own tokens up to the answer. With `readout`, also its
    loss on the object head's output (that softmax over the visual tokens times their values)
    for the questions with `readout_targets`. With `count`, "count": the count head's
    cross-entropy to the uniform distribution over the sink and `count_targets` (its softmax
    over the sink and the visual tokens), and with `readout` too, "count_readout": the
    readout's cross-entropy naming the count from that head's output. With `identity`,
    "identity": per kept token with `identity_targets`, -log(mass of the identity head on its
    targets), its softmax over the sink and the visual tokens up to itself. A kind without
    targets in the batch (or "look" without `looks`, "query" without `query`) is left out."""
    attention = binding_attention(model)
    hidden, (cos, sin) = capture[BINDING_LAYER]  # [B, L, D], [B, L, hd] each
    losses: dict[str, list[torch.Tensor]] = {"object": [], "look": [], "query": [], "count": [], "identity": []}
    outputs, facts, count_outputs, counts = [], [], [], []
    for row, clip in enumerate(clips):
        start, end = clip.visual_span
        if end == start:
            continue
        pairs = [look or (None, None) for look in clip.look_targets] if looks else []
        for kind, head, targets in (("object", OBJECT_HEAD, clip.binding_targets),
                                    ("look", FIRST_LOOK_HEAD, [first for first, _ in pairs]),
                                    ("look", LAST_LOOK_HEAD, [last for _, last in pairs])):
            chosen = [(q, at, t) for q, (at, t) in enumerate(zip(clip.first_answer_at, targets))
                      if t is not None and t.any()]
            if chosen:
                at = torch.tensor([a for _, a, _ in chosen], device=hidden.device)
                scores = head_scores(attention, head, hidden[row], cos[row], sin[row], at, slice(start, end))
                on = torch.stack([t for _, _, t in chosen]).to(hidden.device)  # [Q, V]
                losses[kind].append(scores.logsumexp(-1) - scores.masked_fill(~on, float("-inf")).logsumexp(-1))
                if kind == "object" and readout is not None and clip.readout_targets:
                    taught = [i for i, (q, _, _) in enumerate(chosen) if clip.readout_targets[q] is not None]
                    if taught:
                        values = head_values(attention, OBJECT_HEAD, hidden[row, start:end])
                        outputs.append(scores[taught].softmax(-1) @ values)
                        facts += [clip.readout_targets[chosen[i][0]] for i in taught]
    if count:
        for row, clip in enumerate(clips):
            start, end = clip.visual_span
            chosen = [(at, t) for at, t in zip(clip.first_answer_at, clip.count_targets) if t is not None]
            if not chosen or start == 0:
                continue
            at = torch.tensor([a for a, _ in chosen], device=hidden.device)
            keys = slice(start - 1, end)  # the sink, then the visual tokens
            scores = head_scores(attention, COUNT_HEAD, hidden[row], cos[row], sin[row], at, keys)
            on = torch.stack([t for _, t in chosen]).to(hidden.device)  # [Q, V]: centres per token
            target = torch.cat([torch.ones(len(on), 1, device=hidden.device), on], dim=1)
            target = target / target.sum(-1, keepdim=True)
            losses["count"].append(-(target * scores.log_softmax(-1)).sum(-1))
            if readout is not None:
                values = head_values(attention, COUNT_HEAD, hidden[row, keys])
                count_outputs.append(scores.softmax(-1) @ values)
                counts.append(on.sum(-1).long())
    if identity:
        own = model.lm.model.layers[IDENTITY_LAYER].self_attn
        hidden, (cos, sin) = capture[IDENTITY_LAYER]
        for row, clip in enumerate(clips):
            start, end = clip.visual_span
            if clip.identity_targets is None or start == 0:
                continue
            taught = torch.nonzero(clip.identity_targets.any(-1))[:, 0]
            if len(taught) == 0:
                continue
            scores = head_scores(own, IDENTITY_HEAD, hidden[row], cos[row], sin[row],
                                 (start + taught).to(hidden.device), slice(start - 1, end))  # [Q, 1 + V]
            causal = torch.arange(1 + end - start)[None, :] <= taught[:, None] + 1  # the sink, tokens up to itself
            scores = scores.masked_fill(~causal.to(hidden.device), float("-inf"))
            on = clip.identity_targets[taught].to(hidden.device)
            losses["identity"].append(scores.logsumexp(-1) - scores.masked_fill(~on, float("-inf")).logsumexp(-1))
    if query:
        naming = model.lm.model.layers[QUERY_LAYER].self_attn
        hidden, (cos, sin) = capture[QUERY_LAYER]
        for row, clip in enumerate(clips):
            for at, (start, on) in zip(clip.first_answer_at, clip.naming_targets):
                if on.any():
                    scores = head_scores(naming, QUERY_HEAD, hidden[row], cos[row], sin[row],
                                         torch.tensor([at], device=hidden.device), slice(start, at + 1))[0]
                    on = on.to(hidden.device)
                    losses["query"].append((scores.logsumexp(-1) - scores[on].logsumexp(-1))[None])
    found = {kind: torch.cat(parts).mean() for kind, parts in losses.items() if parts}
    if outputs:
        named = readout.loss(torch.cat(outputs), torch.stack(facts).to(hidden.device))
        if named is not None:
            found["readout"] = named
    if count_outputs:
        found["count_readout"] = F.cross_entropy(readout.count(torch.cat(count_outputs)), torch.cat(counts))
    return found


def head_scores(attention: nn.Module, head: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                at: torch.Tensor, keys: slice) -> torch.Tensor:
    """Attention logits [Q, K] of query head `head` from positions `at` to positions `keys`
    of one sequence (hidden [L, D] is the layer's normed input; cos/sin [L, hd] its rotary)."""
    hd = attention.head_dim
    kv = head // (attention.config.num_attention_heads // attention.config.num_key_value_heads)
    key = attention.k_proj(hidden[keys])[:, kv * hd:(kv + 1) * hd]
    key = key * cos[keys] + rotate_half(key) * sin[keys]
    query = attention.q_proj(hidden[at])[:, head * hd:(head + 1) * hd]
    query = query * cos[at] + rotate_half(query) * sin[at]
    return (query @ key.T) * attention.scaling


def head_values(attention: nn.Module, head: int, hidden: torch.Tensor) -> torch.Tensor:
    """The values [K, head_dim] that query head `head` reads from positions `hidden` [K, D]
    (the layer's normed input): its KV group's slice of v_proj."""
    hd = attention.head_dim
    kv = head // (attention.config.num_attention_heads // attention.config.num_key_value_heads)
    return attention.v_proj(hidden)[:, kv * hd:(kv + 1) * hd]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def token_owners(kept: VisualTokens, owners: torch.Tensor) -> torch.Tensor:
    """[N] int64: bit i set where object i covers part of kept token n.
    owners [T, Gm, Gm] uint8 is that bit mask for every merged token of the clip."""
    return owners[kept.frame_index.cpu(), kept.grid_rc[:, 0].cpu(), kept.grid_rc[:, 1].cpu()].long()


def binding_masks(kept: VisualTokens, owners: torch.Tensor, questions: list[sw.Question]) -> list[torch.Tensor]:
    """Per question, which kept tokens show one of its objects (in its frame, if it names one)."""
    present = token_owners(kept, owners)
    masks = []
    for question in questions:
        bits = sum(1 << i for i in question.object_ids)
        mask = (present & bits) != 0
        if question.frame_index is not None:
            mask &= kept.frame_index.cpu() == question.frame_index
        masks.append(mask)
    return masks


def look_masks(kept: VisualTokens, owners: torch.Tensor,
               questions: list[sw.Question]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per question about one object: (its tokens in the first kept frame that shows it, its
    tokens in the last); None for questions about several objects or an object not in view."""
    present = token_owners(kept, owners)
    frame = kept.frame_index.cpu()
    looks = []
    for question in questions:
        shows = (present & (1 << question.object_ids[0])) != 0 if len(question.object_ids) == 1 else None
        if shows is None or not shows.any():
            looks.append(None)
            continue
        seen = frame[shows]
        looks.append((shows & (frame == seen.min()), shows & (frame == seen.max())))
    return looks


def packed_answer_loss(model: VLM, clips: list[PackedClip], binding: bool = False, look_weight: float = 0.0,
                       query_weight: float = 0.0, readout: ObjectReadout | None = None, readout_weight: float = 0.0,
                       count_weight: float = 0.0, identity_weight: float = 0.0,
                       parts: dict | None = None) -> tuple[torch.Tensor, float]:
    """Cross-entropy over every answer token of a batch of packed clips (same mean as
    `answer_loss`), plus, when `binding`, the object head's term (BINDING_WEIGHT) and, when
    `look_weight` / `query_weight` > 0, the look heads' / the naming head's term at that
    weight, `readout`'s at `readout_weight`, the count head's at `count_weight` (its readout
    at `readout_weight`) and the identity head's at `identity_weight`. `parts`, if given,
    receives each term's value (nats, unweighted)."""
    if look_weight > 0 and count_weight > 0:
        raise ValueError("the look heads and the count head are the same heads of BINDING_LAYER: weight one of them")
    capture = {} if binding else None
    logits, labels = packed_logits(model, clips, capture)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    if parts is not None:
        parts["answer"] = loss.item()
    if binding:
        weights = {"object": BINDING_WEIGHT, "look": look_weight, "query": query_weight, "readout": readout_weight,
                   "count": count_weight, "count_readout": readout_weight, "identity": identity_weight}
        terms = binding_loss(model, clips, capture, looks=look_weight > 0, query=query_weight > 0,
                             readout=readout if readout_weight > 0 else None, count=count_weight > 0,
                             identity=identity_weight > 0)
        for kind, extra in terms.items():
            loss = loss + weights[kind] * extra
            if parts is not None:
                parts[kind] = extra.item()
    rows = torch.tensor([row for row, c in enumerate(clips) for _ in c.first_answer_at])
    at = torch.tensor([i for c in clips for i in c.first_answer_at])
    targets = torch.tensor([t for c in clips for t in c.first_answer_ids], device=logits.device)
    accuracy = float((logits[rows, at].argmax(-1) == targets).float().mean())
    return loss, accuracy


def answer_loss(model: VLM, sequences) -> tuple[torch.Tensor, float]:
    """Teacher-forced cross-entropy on the answer tokens (and EOS) of a padded batch."""
    embed = model.runner.embed
    rows, lengths = [], []
    for prompt, answer_ids in sequences:
        answer = torch.tensor(answer_ids)
        embeds = torch.cat([prompt.embeds, embed(answer[:-1])])
        positions = torch.cat([prompt.positions, prompt.positions[-1] + 1 + torch.arange(len(answer) - 1)])
        labels = torch.full((len(embeds),), -100)
        labels[len(prompt.embeds) - 1:] = answer
        rows.append((embeds, positions, labels))
        lengths.append(len(embeds))
    longest = max(lengths)
    width = rows[0][0].shape[1]
    batch = len(rows)
    embeds = torch.zeros(batch, longest, width)
    positions = torch.zeros(batch, longest, dtype=torch.long)
    labels = torch.full((batch, longest), -100)
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, (e, p, l) in enumerate(rows):
        embeds[row, : len(e)], positions[row, : len(p)], labels[row, : len(l)] = e, p, l
        mask[row, : len(e)] = 1
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    first = torch.tensor([len(p.embeds) - 1 for p, _ in sequences])
    first_targets = torch.tensor([a[0] for _, a in sequences])
    accuracy = float((logits[torch.arange(batch), first].argmax(-1) == first_targets).float().mean())
    return loss, accuracy


def prefetch(pool, fn: Callable, jobs: Iterable[tuple], ahead: int = 8) -> Iterator:
    """fn(*job) for every job, in order. With a process pool, up to `ahead` jobs run in the
    workers ahead of the consumer (bounded, unlike Pool.imap, which queues every job at once)."""
    if pool is None:
        for job in jobs:
            yield fn(*job)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(fn, job))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@contextmanager
def worker_pool(workers: int):
    """Processes that render clips (numpy only; forked before the model exists), or None."""
    if workers <= 0:
        yield None
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool


def train_tiny(out: Path, config: TrainConfig, report: Callable[[str], None] = print) -> VLM:
    out = Path(out)
    started = time.monotonic()
    with worker_pool(config.workers) as pool:
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        if config.qa_from:
            model = VLM.from_pretrained(config.qa_from, device=config.device)
        elif config.perception_from:
            model = model_on_tower(config.perception_from, config.seed, config.place_scale, config.time_scale)
            model = model.to(config.device)
        else:
            model = new_model(config.seed, config.place_scale, config.time_scale).to(config.device)
        done = {"qa": 0 if not config.qa_from else config.qa_steps, "robust": 0}

        def save(stage: str, step: int) -> None:
            done[stage] = step
            model.config.trained = True
            model.config.notes = {
                "trained_by": "vidsieve train tiny",
                "train_config": {k: v for k, v in asdict(config).items() if k != "log"},
                "qa_steps_done": done["qa"], "robust_steps_done": done["robust"],
                "train_minutes": round((time.monotonic() - started) / 60, 1)}
            model.save_pretrained(out)
            (out / "training_log.json").write_text(json.dumps(config.log, indent=1))
            report(f"checkpoint after {stage} step {step} saved to {out}")

        if config.qa_from:
            report(f"stages 1-2: the model of {config.qa_from} (trained by this recipe's stages 1 and 2)")
            pools = encode_pools(model, config, report, pool)
        else:
            if config.perception_from:
                report(f"stage 1: the tower of {config.perception_from} (trained by this recipe's stage 1)")
            else:
                report(f"stage 1: perception pretraining, {config.perception_steps} steps on {config.device}")
                train_perception(model, config, report, pool)
            report(f"stage 2: question answering, {config.qa_steps} steps")
            pools = train_qa(model, config, report, pool, checkpoint=lambda step: save("qa", step))
        if config.robust_steps > 0:
            report(f"stage 3: robustness, {config.robust_steps} steps")
            train_robust(model, config, report, pools, checkpoint=lambda step: save("robust", step))
    model.eval()
    report(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return model
