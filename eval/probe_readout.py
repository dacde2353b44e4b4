"""Readout probe: can the LM answer from an object's tokens when it sees nothing else?

    python -m eval.probe_readout --tower runs/tiny-a-step1000 --steps 600

A fresh projector + LM, on a tower trained by stage 1 of `eval.train_tiny`, learns attribute
and fine-detail questions where each question sees ONLY the visual tokens of its own object
(`train_tiny.binding_masks`). Attention then has nothing to find, so the curve measures the
content path alone: tower token -> projector -> value -> answer word. docs/TRAINING.md
compares it with the full task, where the same LM stays at the answer prior.
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
    """One packed clip per question of `types`, holding only its objects' tokens."""
    tokens = tt.pool_tokens(model, pool, index)
    eos = model.tokenizer.eos_token_id
    clips = []
    for question, mask in zip(pool.questions[index], tt.binding_masks(tokens, pool.owners[index], pool.questions[index])):
        if question.type in types and mask.any():
            answer = model.tokenizer(question.answer, add_special_tokens=False).input_ids + [eos]
            kept = tokens.select(torch.nonzero(mask)[:, 0])
            clips.append(tt.pack_clip(model, kept, tokens.span_length, [question.text], [answer]))
    return clips


def main(argv: list[str] | None = None) -> None:
    parser = tt.probe_parser("python -m eval.probe_readout", __doc__, steps=600, clips_per_step=12,
                             train_clips=1500, val_clips=60)
    parser.add_argument("--all-types", action="store_true", help="every question type, not just attribute and fine detail")
    args = parser.parse_args(argv)
    model, train, val, optimizer, params = tt.start_probe(args)
    types = tuple(sw.QUESTION_TYPES) if args.all_types else READ_OUT_TYPES
    rng = random.Random(0)
    started = time.monotonic()
    for step in range(1, args.steps + 1):
        batch = [c for i in rng.sample(range(len(train)), args.clips_per_step) for c in object_only_clips(model, train, i, types)]
        loss, accuracy = tt.packed_answer_loss(model, batch)
        tt.optimizer_step(optimizer, params, loss, args.lr, step / args.steps)
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                _, val_accuracy = tt.packed_answer_loss(
                    model, [c for i in range(len(val)) for c in object_only_clips(model, val, i, types)])
            print(f"{time.monotonic() - started:.0f}s step {step} loss {loss.item():.3f} "
                  f"train acc {accuracy:.3f} val acc ({'every type' if args.all_types else 'attribute + fine detail'}, "
                  f"object tokens only) {val_accuracy:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
