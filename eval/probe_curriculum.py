"""Curriculum probe: questions first see only their object's tokens, then ever more of the clip.

    python -m eval.probe_curriculum --tower runs/tiny-a-step1000 --steps 1500 --ramp 1000

The readout probe (`eval.probe_readout`) shows the LM reads an object's content quickly when
nothing else is in view, while with the whole clip in view it stays at the answer prior. Here
each question is packed with its object's tokens plus a random fraction d of the clip's other
tokens, d rising linearly from 0 to 1 over `--ramp` steps, with binding supervision on
(unless `--no-binding`); after
the ramp every clip is whole and its questions are packed together as in `eval.train_tiny`.
Validation is always on whole clips (`train_tiny.packed_eval`), so the curve says whether
what is learnt in isolation carries over to the real task.
"""

from __future__ import annotations

import json
import random
import time

import torch

from compressors import parse_spec
from eval import train_tiny as tt
from vlm.model import VLM


def ramped_clips(model: VLM, pool: tt.ClipPool, index: int, others: float, rng: random.Random) -> list[tt.PackedClip]:
    """One packed clip per question: its objects' tokens plus a fraction `others` of the rest."""
    tokens = tt.pool_tokens(model, pool, index)
    eos = model.tokenizer.eos_token_id
    clips = []
    questions = pool.questions[index]
    for question, mask in zip(questions, tt.binding_masks(tokens, pool.owners[index], questions)):
        keep = mask | (torch.rand(len(tokens), generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) < others)
        if not keep.any():
            continue
        chosen = torch.nonzero(keep)[:, 0]
        answer = model.tokenizer(question.answer, add_special_tokens=False).input_ids + [eos]
        clips.append(tt.pack_clip(model, tokens.select(chosen), tokens.span_length, [question.text], [answer],
                                  [mask[chosen]]))
    return clips


def main(argv: list[str] | None = None) -> None:
    parser = tt.probe_parser("python -m eval.probe_curriculum", __doc__, steps=1500, clips_per_step=8,
                             train_clips=4000, val_clips=120)
    parser.add_argument("--ramp", type=int, default=1000, help="steps over which the other tokens come back")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--no-binding", action="store_true", help="answer loss only (no binding supervision)")
    args = parser.parse_args(argv)
    model, train, val, optimizer, params = tt.start_probe(args)
    whole = parse_spec("none")
    rng = random.Random(0)
    started = time.monotonic()
    model.lm.train()
    for step in range(1, args.steps + 1):
        chosen = rng.sample(range(len(train)), args.clips_per_step)
        others = min(1.0, step / args.ramp)
        if others < 1.0:
            batch = [c for i in chosen for c in ramped_clips(model, train, i, others, rng)]
        else:
            batch = [tt.packed_from_pool(model, train, i, whole, 0) for i in chosen]
        loss, accuracy = tt.packed_answer_loss(model, batch, binding=not args.no_binding)
        tt.optimizer_step(optimizer, params, loss, args.lr, step / args.steps)
        if step % args.eval_every == 0 or step == args.steps:
            model.lm.eval()
            result = tt.packed_eval(model, val)
            model.lm.train()
            print(f"{time.monotonic() - started:.0f}s step {step} others {others:.2f} loss {loss.item():.3f} "
                  f"train acc {accuracy:.3f} val (whole clips) {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
