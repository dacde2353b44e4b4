"""Can vidsieve-tiny's LM learn to find one object among N visual tokens? A synthetic probe.

    python -m eval.probe_binding --frames 1:300                        # 16 tokens: learns
    python -m eval.probe_binding --frames 4:300                        # 64 tokens: stuck
    python -m eval.probe_binding --frames 1:200,4:200,16:200           # the curriculum: learns all
    python -m eval.probe_binding --frames 1:300 --projector vidsieve   # through our projector
    python -m eval.probe_binding --frames 1:300 --projector vidsieve --straddling  # objects off the merge grid

No rendering and no tower: each frame is a 4x4 grid of tokens, four objects with distinct
colours and shapes on one random cell each, the rest background; a token's feature is the
one-hot of its colour and shape. Questions name an object by one attribute and ask the other
("what shape is the red object ?"). With `--projector linear` one trained linear layer maps the
one-hot to the LM width; with `--projector vidsieve` each object fills a 2x2 block of patches
and vidsieve-tiny's own projector merges them, as in the model. Binding supervision
(`eval.train_tiny.binding_loss`) is on unless `--no-binding`. docs/TRAINING.md records what
this measured.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from compressors import VisualTokens
from eval import shapesworld as sw
from eval.train_tiny import new_model, optimizer_step, pack_clip, packed_answer_loss

OBJECTS = 4
GRID = 4  # tokens per side of a frame
FEATURES = len(sw.COLOURS) + len(sw.SHAPES) + 1  # colour, shape, background


def parse_schedule(text: str) -> list[tuple[int, int]]:
    """'1:200,4:200' -> [(1, 200), (4, 200)]: (frames, steps) stages."""
    return [tuple(int(x) for x in stage.split(":")) for stage in text.split(",")]


def straddling_objects(model, frames: int, colours, shapes, rng: random.Random):
    """Patch features [T, 2G, 2G, width] with each object on a random 2x2 block of patches, off
    the merge grid as often as not (so it straddles tokens and shares some with other objects),
    and which objects each merged token shows, as bitmasks [T, G*G]."""
    side = 2 * GRID
    patches = torch.zeros(frames, side, side, model.encoder.width)
    patches[..., FEATURES - 1] = 1
    owners = torch.zeros(frames, GRID * GRID, dtype=torch.long)
    for t in range(frames):
        for obj in range(OBJECTS):
            top, left = rng.randrange(side - 1), rng.randrange(side - 1)
            for row in (top, top + 1):
                for col in (left, left + 1):
                    feature = patches[t, row, col]
                    feature.zero_()
                    feature[sw.COLOURS.index(colours[obj])] = 1
                    feature[len(sw.COLOURS) + sw.SHAPES.index(shapes[obj])] = 1
                    owners[t, (row // 2) * GRID + col // 2] |= 1 << obj
    return patches, owners


def synthetic_clip(model, project, frames: int, rng: random.Random, vidsieve_projector: bool,
                   straddling: bool = False):
    colours, shapes = rng.sample(sw.COLOURS, OBJECTS), rng.sample(sw.SHAPES, OBJECTS)
    if straddling:
        patches, owners = straddling_objects(model, frames, colours, shapes, rng)
        return ask(model, VisualTokens.from_grid(project(patches), np.arange(frames) / sw.DEFAULT_CONFIG.fps),
                   colours, shapes, lambda obj: (owners.flatten() & (1 << obj)) != 0, rng)
    features = torch.zeros(frames, GRID, GRID, FEATURES)
    features[..., -1] = 1
    owner = torch.full((frames, GRID * GRID), -1)
    for t in range(frames):
        for obj, cell in enumerate(rng.sample(range(GRID * GRID), OBJECTS)):
            owner[t, cell] = obj
            feature = features[t, cell // GRID, cell % GRID]
            feature.zero_()
            feature[sw.COLOURS.index(colours[obj])] = 1
            feature[len(sw.COLOURS) + sw.SHAPES.index(shapes[obj])] = 1
    if vidsieve_projector:  # every object fills the 2x2 patches that merge into its token
        patches = torch.zeros(frames, 2 * GRID, 2 * GRID, model.encoder.width)
        patches[..., :FEATURES] = features.repeat_interleave(2, 1).repeat_interleave(2, 2)
        embeds = project(patches)
    else:
        embeds = project(features)
    tokens = VisualTokens.from_grid(embeds, np.arange(frames) / sw.DEFAULT_CONFIG.fps)
    return ask(model, tokens, colours, shapes, lambda obj: owner.flatten() == obj, rng)


def ask(model, tokens: VisualTokens, colours, shapes, shows, rng: random.Random):
    """Four questions about the objects, packed after `tokens`; shows(obj) -> its tokens [N] bool."""
    asked = []
    for obj in range(OBJECTS):
        asked.append((f"what shape is the {colours[obj]} object ?", shapes[obj], obj))
        asked.append((f"what colour is the {shapes[obj]} ?", colours[obj], obj))
    asked = rng.sample(asked, 4)
    eos = model.tokenizer.eos_token_id
    answers = [model.tokenizer(answer, add_special_tokens=False).input_ids + [eos] for _, answer, _ in asked]
    targets = [shows(obj) for _, _, obj in asked]
    return pack_clip(model, tokens, tokens.span_length, [q for q, _, _ in asked], answers, targets)


# The probe feeds the LM synthetic features and never runs the tower; but the tower is built
# first, so its shape fixes the LM's init. This is the tower the probe's recorded runs were
# built with (docs/TRAINING.md; before the recipe's tower read motion), so they rerun exactly.
PROBE_TOWER = {"image_size": 128, "patch_size": 16, "width": 96, "layers": 3, "head_width": 32,
               "mlp_ratio": 2.0, "conv_stem": [16, 32, 48, 64]}


def run_probe(schedule: list[tuple[int, int]], projector: str = "linear", binding: bool = True,
              clips_per_step: int = 24, lr: float = 1.5e-3, seed: int = 0, straddling: bool = False,
              report=print) -> list[float]:
    """Train on the synthetic task through `schedule`; returns the first-token training accuracy of every step."""
    model = new_model(seed, vision=PROBE_TOWER)
    vidsieve_projector = projector == "vidsieve"
    project = model.projector if vidsieve_projector else torch.nn.Linear(FEATURES, model.lm.config.hidden_size)
    params = list(project.parameters()) + list(model.lm.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    total, accuracies, started = sum(steps for _, steps in schedule), [], time.monotonic()
    model.lm.train()
    for frames, steps in schedule:
        for _ in range(steps):
            clips = [synthetic_clip(model, project, frames, rng, vidsieve_projector, straddling)
                     for _ in range(clips_per_step)]
            loss, accuracy = packed_answer_loss(model, clips, binding=binding)
            accuracies.append(accuracy)
            optimizer_step(optimizer, params, loss, lr, len(accuracies) / total)
            if len(accuracies) % 50 == 0:
                report(f"step {len(accuracies)} frames {frames} ({frames * GRID * GRID} tokens) loss {loss.item():.3f} "
                       f"first-token acc {accuracy:.2f} ({time.monotonic() - started:.0f} s)")
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.probe_binding", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="1:300", help="FRAMES:STEPS stages, e.g. 1:200,4:200,16:200")
    parser.add_argument("--projector", choices=("linear", "vidsieve"), default="linear")
    parser.add_argument("--no-binding", action="store_true", help="answer loss only")
    parser.add_argument("--straddling", action="store_true",
                        help="(with --projector vidsieve) objects on random 2x2 patch blocks, off the merge grid")
    parser.add_argument("--clips-per-step", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.straddling and args.projector != "vidsieve":
        parser.error("--straddling needs --projector vidsieve (objects on patches that the projector merges)")
    run_probe(parse_schedule(args.frames), args.projector, not args.no_binding, args.clips_per_step, args.lr,
              args.seed, args.straddling, report=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
