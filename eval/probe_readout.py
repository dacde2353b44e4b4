"""Readout probe: can the LM answer from an object's tokens when it sees nothing else?

    python -m eval.probe_readout --tower runs/tiny-a-step1000 --steps 600
    python -m eval.probe_readout --tower runs/tiny-a-step1000 --types position,motion,attribute --looks 1

A fresh projector + LM, on a tower trained by stage 1 of `eval.train_tiny`, learns attribute
and fine-detail questions where each question sees ONLY the visual tokens of its own object
(`train_tiny.binding_masks`). Attention then has nothing to find, so the curve measures the
content path alone: tower token -> projector -> value -> answer word. `--types` picks the
question types (accuracy is printed per type) and `--looks W` supervises the first-look /
last-look heads (`train_tiny.look_masks`) at weight W. docs/TRAINING.md compares it with the
full task.
"""

from __future__ import annotations

import random
import time

import torch

from eval import shapesworld as sw
from eval import train_tiny as tt
from vlm.model import VLM

READ_OUT_TYPES = ("attribute", "fine_detail")


def object_only_clips(model: VLM, pool: tt.ClipPool, index: int,
                      types: tuple[str, ...] = READ_OUT_TYPES) -> list[tt.PackedClip]:
    """One packed clip per question of `types`, holding only its objects' tokens (with the
    look heads' targets, `train_tiny.look_masks`, for `--looks`)."""
    tokens = tt.pool_tokens(model, pool, index)
    eos = model.tokenizer.eos_token_id
    clips = []
    for question, mask in zip(pool.questions[index], tt.binding_masks(tokens, pool.owners[index], pool.questions[index])):
        if question.type in types and mask.any():
            answer = model.tokenizer(question.answer, add_special_tokens=False).input_ids + [eos]
            kept = tokens.select(torch.nonzero(mask)[:, 0])
            looks = tt.look_masks(kept, pool.owners[index], [question])
            clips.append(tt.pack_clip(model, kept, tokens.span_length, [question.text], [answer], None, looks))
    return clips


def main(argv: list[str] | None = None) -> None:
    parser = tt.probe_parser("python -m eval.probe_readout", __doc__, steps=600, clips_per_step=12,
                             train_clips=1500, val_clips=60)
    parser.add_argument("--all-types", action="store_true", help="every question type, not just attribute and fine detail")
    parser.add_argument("--types", help="comma-separated question types to ask (default: attribute,fine_detail)")
    parser.add_argument("--looks", type=float, default=0.0, metavar="WEIGHT",
                        help="supervise the first-look / last-look heads at this weight (default: off)")
    args = parser.parse_args(argv)
    types = tuple(sw.QUESTION_TYPES) if args.all_types else READ_OUT_TYPES
    if args.types:
        types = tuple(args.types.split(","))
        if unknown := set(types) - set(sw.QUESTION_TYPES):
            parser.error(f"unknown question types {sorted(unknown)}; known: {', '.join(sw.QUESTION_TYPES)}")
    model, train, val, optimizer, params = tt.start_probe(args)
    rng = random.Random(0)
    started = time.monotonic()
    for step in range(1, args.steps + 1):
        batch = [c for i in rng.sample(range(len(train)), args.clips_per_step) for c in object_only_clips(model, train, i, types)]
        loss, accuracy = tt.packed_answer_loss(model, batch, binding=args.looks > 0, look_weight=args.looks)
        tt.optimizer_step(optimizer, params, loss, args.lr, step / args.steps)
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                per_type = {kind: tt.packed_answer_loss(model, [c for i in range(len(val))
                                                               for c in object_only_clips(model, val, i, (kind,))])[1]
                            for kind in types}
            print(f"{time.monotonic() - started:.0f}s step {step} loss {loss.item():.3f} train acc {accuracy:.3f} "
                  f"val acc (object tokens only) " + " ".join(f"{k} {v:.3f}" for k, v in per_type.items()),
                  flush=True)


if __name__ == "__main__":
    main()
