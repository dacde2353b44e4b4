"""Train vidsieve-tiny on ShapesWorld: perception first, then question answering.

Real VLMs are trained in stages, and a synthetic world gives dense labels for free:

1. Perception. The vision tower alone learns, for every 16x16 patch of every frame, the
   colour, shape and size of the object covering most of it and the colour of a fine-detail
   dot inside it. Targets are per patch and come from the scene state, so tokens stay local:
   nothing rewards smearing the scene into every patch.
2. Question answering. With the tower frozen, the projector (patch merge, where/when
   embeddings) and the language model learn to answer ShapesWorld questions. Each clip's
   visual tokens go through a randomly chosen compressor first (random drops, pooling,
   frame subsets), so the model is robust to missing tokens as real VLMs are to variable
   frame counts and resolutions; about a third of clips keep every token.

Clips are generated on the fly (about 200 clips/s), so the model never sees a clip twice.
`vidsieve train tiny --out FOLDER` runs both stages and saves through `save_pretrained`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressors import CompressionContext, VisualTokens, parse_spec
from eval import shapesworld as sw
from vlm.model import VLM, VLMConfig
from vlm.tokenizer import build_word_tokenizer

# Compressors a training clip goes through, with their sampling weights: full tokens a third
# of the time, the rest spread over the kinds of loss a compressor inflicts.
AUGMENTATIONS = (
    ("none", 6), ("random:ratio=0.75", 1), ("random:ratio=0.5", 2), ("random:ratio=0.25", 2),
    ("random:ratio=0.1", 1), ("avgpool:factor=2", 2), ("uniform:every=2", 2), ("random:per_frame=2", 1),
)


@dataclass
class TrainConfig:
    perception_minutes: float = 10.0
    qa_minutes: float = 60.0
    perception_clips_per_step: int = 4  # x 16 frames
    perception_lr: float = 2e-3
    qa_clips_per_step: int = 24  # every question of each clip is asked (packed, see PackedClip)
    qa_lr: float = 1.5e-3
    weight_decay: float = 0.01
    seed: int = 0
    eval_every_s: float = 600.0
    eval_clips: int = 60
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


def new_model(seed: int) -> VLM:
    torch.manual_seed(seed)
    config = VLMConfig.from_name("vidsieve-tiny")
    tokenizer = build_word_tokenizer(shapesworld_vocabulary())
    config.lm["vocab_size"] = 8 * math.ceil(len(tokenizer) / 8)
    return VLM(config, tokenizer)


# --- stage 1: perception ---------------------------------------------------------------------

class PerceptionHeads(nn.Module):
    """Per-patch classifiers on the tower's tokens; class 0 is 'nothing' everywhere."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, len(sw.COLOURS) + 1)
        self.shape = nn.Linear(width, len(sw.SHAPES) + 1)
        self.size = nn.Linear(width, len(sw.SIZES) + 1)
        self.dot = nn.Linear(width, len(sw.COLOURS) + 1)


DOT_CLASS_WEIGHTS = torch.tensor([1.0] + [20.0] * len(sw.COLOURS))


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
    dot = np.zeros((frames, grid, grid), np.int64)
    for obj in scene.objects:
        if obj.dot_colour is None:
            continue
        for t in np.flatnonzero(scene.dot_visible[obj.object_id]):
            x_px, y_px = scene.centres_px[obj.object_id, t]
            dot[t, int(y_px) // patch_px, int(x_px) // patch_px] = sw.COLOURS.index(obj.dot_colour) + 1
    targets["dot"] = dot
    return targets


def train_perception(model: VLM, config: TrainConfig, report: Callable[[str], None]) -> None:
    encoder = model.encoder.train()
    heads = PerceptionHeads(encoder.width)
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.perception_lr, weight_decay=config.weight_decay)
    deadline = time.monotonic() + 60 * config.perception_minutes
    total_s = 60 * config.perception_minutes
    step, index = 0, 0
    while time.monotonic() < deadline:
        frames, targets = [], {"colour": [], "shape": [], "size": [], "dot": []}
        for _ in range(config.perception_clips_per_step):
            scene, _ = sw.scene_and_questions("train", index)
            index += 1
            rgb, object_ids = sw.render_with_labels(scene)
            frames.append(rgb)
            for name, value in patch_targets(scene, object_ids, encoder.patch_size).items():
                targets[name].append(value)
        pixels = encoder.preprocess(np.concatenate(frames))
        tokens = encoder(pixels)  # [B*T, G, G, width]
        # Dots cover one patch in hundreds: weight their classes up so "no dot" cannot win by default.
        losses = {name: F.cross_entropy(getattr(heads, name)(tokens).flatten(0, 2),
                                        torch.from_numpy(np.concatenate(values)).flatten().long(),
                                        weight=DOT_CLASS_WEIGHTS if name == "dot" else None)
                  for name, values in targets.items()}
        loss = sum(losses.values())
        optimizer_step(optimizer, params, loss, config.perception_lr, 1 - (deadline - time.monotonic()) / total_s)
        step += 1
        if step % 50 == 0:
            with torch.no_grad():
                dot_hits = patch_accuracy(heads.dot(tokens), targets["dot"])
                colour_hits = patch_accuracy(heads.colour(tokens), targets["colour"])
            report(f"perception step {step} clips {index} loss {loss.item():.3f} "
                   f"object-colour acc {colour_hits:.3f} dot acc {dot_hits:.3f}")
            config.log.append({"stage": "perception", "step": step, "clips": index, "loss": loss.item(),
                               "colour_acc": colour_hits, "dot_acc": dot_hits})
    encoder.eval()


def patch_accuracy(logits: torch.Tensor, targets: list[np.ndarray]) -> float:
    """Accuracy over patches that have something to predict (target != 0)."""
    target = torch.from_numpy(np.concatenate(targets)).long()
    mask = target != 0
    return float((logits.argmax(-1)[mask] == target[mask]).float().mean()) if mask.any() else 1.0


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

def train_qa(model: VLM, config: TrainConfig, report: Callable[[str], None]) -> None:
    model.encoder.requires_grad_(False).eval()
    params = list(model.projector.parameters()) + list(model.lm.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.qa_lr, weight_decay=config.weight_decay)
    specs = [parse_spec(text) for text, _ in AUGMENTATIONS]
    weights = [weight for _, weight in AUGMENTATIONS]
    rng = random.Random(config.seed)
    eos = model.tokenizer.eos_token_id
    total_s = 60 * config.qa_minutes
    deadline = time.monotonic() + total_s
    next_eval = time.monotonic() + config.eval_every_s
    step, index, seen = 0, 0, 0
    model.lm.train()
    while time.monotonic() < deadline:
        clips = []
        for _ in range(config.qa_clips_per_step):
            scene, questions = sw.scene_and_questions("train", 10_000_000 + index)
            index += 1
            clips.append((sw.render(scene), questions))
        with torch.no_grad():
            features = model.encoder(model.encoder.preprocess(np.concatenate([c[0] for c in clips])))
        features = features.view(len(clips), -1, *features.shape[1:])  # [B, T, G, G, width]
        packed = []
        for clip_features, (frames, questions) in zip(features, clips):
            tokens = VisualTokens.from_grid(model.projector(clip_features), np.arange(len(frames)) / 8.0)
            spec = rng.choices(specs, weights)[0]
            ctx = CompressionContext(budget=spec.budget, seed=rng.randrange(1 << 30), model=model)
            kept = spec.compressor.compress(tokens, ctx)
            answers = [model.tokenizer(q.answer, add_special_tokens=False).input_ids + [eos] for q in questions]
            packed.append(pack_clip(model, kept, tokens.span_length, [q.text for q in questions], answers))
            seen += len(questions)
        loss, accuracy = packed_answer_loss(model, packed)
        optimizer_step(optimizer, params, loss, config.qa_lr, 1 - (deadline - time.monotonic()) / total_s)
        step += 1
        if step % 25 == 0:
            report(f"qa step {step} clips {index} questions {seen} loss {loss.item():.3f} "
                   f"first-token acc {accuracy:.3f}")
            config.log.append({"stage": "qa", "step": step, "clips": index, "loss": loss.item(),
                               "train_acc": accuracy})
        if time.monotonic() >= next_eval:
            model.lm.eval()
            result = quick_eval(model, config.eval_clips)
            model.lm.train()
            report(f"qa eval after {index} clips: {json.dumps(result)}")
            config.log.append({"stage": "qa-eval", "clips": index, **result})
            next_eval = time.monotonic() + config.eval_every_s
    model.lm.eval()


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


def pack_clip(model: VLM, kept: VisualTokens, span_length: int, questions: list[str],
              answers: list[list[int]]) -> PackedClip:
    prefix_ids, _ = model._prompt_ids("")
    embeds, positions, _, _ = model._layout(prefix_ids, kept, torch.arange(len(prefix_ids)))
    after_video = len(prefix_ids) + span_length
    parts, labels, segments = [(embeds, positions)], [torch.full((len(embeds),), -100)], [torch.zeros(len(embeds))]
    offset, first_at = len(embeds), []
    for segment, (question, answer) in enumerate(zip(questions, answers), start=1):
        _, suffix_ids = model._prompt_ids(question)
        ids = torch.cat([suffix_ids, torch.tensor(answer[:-1], dtype=torch.long)])
        parts.append((model.runner.embed(ids), after_video + torch.arange(len(ids))))
        labels.append(torch.cat([torch.full((len(suffix_ids) - 1,), -100), torch.tensor(answer)]))
        segments.append(torch.full((len(ids),), segment))
        first_at.append(offset + len(suffix_ids) - 1)
        offset += len(ids)
    return PackedClip(torch.cat([e for e, _ in parts]), torch.cat([p for _, p in parts]), torch.cat(labels),
                      torch.cat(segments).long(), first_at, [a[0] for a in answers])


def packed_answer_loss(model: VLM, clips: list[PackedClip]) -> tuple[torch.Tensor, float]:
    """Cross-entropy over every answer token of a batch of packed clips (same mean as `answer_loss`)."""
    longest = max(len(c.embeds) for c in clips)
    batch, width = len(clips), clips[0].embeds.shape[1]
    embeds = torch.zeros(batch, longest, width)
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
    logits = model.lm(inputs_embeds=embeds, attention_mask=allowed[:, None], position_ids=positions).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    rows = torch.tensor([row for row, c in enumerate(clips) for _ in c.first_answer_at])
    at = torch.tensor([i for c in clips for i in c.first_answer_at])
    targets = torch.tensor([t for c in clips for t in c.first_answer_ids])
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


@torch.no_grad()
def quick_eval(model: VLM, clips: int, split: str = "val", spec: str = "none") -> dict:
    """Greedy answers through the real inference path on in-memory clips: accuracy per type."""
    hits: dict[str, list[int]] = {}
    for frames, questions in sw.iter_samples(split, 0, clips):
        timestamps = np.arange(len(frames)) / 8.0
        for question in questions:
            text = model.answer(frames, timestamps, question.text, spec).text
            hits.setdefault(question.type, []).append(int(text.strip() == question.answer))
    per_type = {name: round(sum(v) / len(v), 3) for name, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return {"overall": round(overall, 3), **per_type}


def train_tiny(out: Path, config: TrainConfig, report: Callable[[str], None] = print) -> VLM:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = new_model(config.seed)
    started = time.monotonic()
    report(f"stage 1: perception pretraining for {config.perception_minutes} min")
    train_perception(model, config, report)
    report(f"stage 2: question answering for {config.qa_minutes} min")
    train_qa(model, config, report)
    model.config.trained = True
    model.config.notes = {"trained_by": "vidsieve train tiny", "train_config": {
        k: v for k, v in asdict(config).items() if k != "log"}, "train_minutes": round((time.monotonic() - started) / 60, 1)}
    model.eval()
    model.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(config.log, indent=1))
    report(f"saved to {out}")
    return model
