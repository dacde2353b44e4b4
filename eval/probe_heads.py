"""What the supervised object head of a trained vidsieve-tiny sees, per question type.

    python -m eval.probe_heads --model runs/tiny-k --clips 960 --pool-cache runs/pool-cache

For each question type, over the training-split clips of the QA pool (every question, the
`none` compressor):

- **mass**: the geometric mean of the object head's attention mass on the tokens of the
  question's objects (`binding_masks`), the softmax over the clip's visual tokens: how well
  the head finds what the question is about;
- **readable**: the held-out accuracy of a linear classifier (multinomial logistic regression,
  every fourth question held out) from the head's output at the answer position (its
  attention-weighted values, before `o_proj`) to the answer word: how much of the answer the
  head hands to the layers above. Beside it, the model's own accuracy on the same questions.
  The classifier does not see the question, so a type whose questions ask different things
  (attribute: a colour or a shape) reads lower than what the head carries; compare types
  whose questions all ask the same thing (position, motion, fine detail).

A type the head finds and reads out (high mass, high readable) but the model answers at chance
is lost in the layers above; low readable with high mass means the head's values drop what
the answer needs. docs/TRAINING.md records what this said about position and motion.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from compressors import parse_spec
from eval import train_tiny as tt
from vlm.model import VLM


def head_outputs(model: VLM, pool: tt.ClipPool, clips: int, batch: int = 24) -> dict[str, dict[str, list]]:
    """Per question type: the object head's output, its log-mass on the targets, the answer's
    first token id and whether the model's greedy first token was right."""
    attention = tt.binding_attention(model)
    spec = parse_spec("none")
    found: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        for start in range(0, clips, batch):
            indices = range(start, min(start + batch, clips))
            packed = [tt.packed_from_pool(model, pool, i, spec, seed=i, every_question=True) for i in indices]
            capture: dict = {}
            logits, _ = tt.packed_logits(model, packed, capture)
            hidden, (cos, sin) = capture[tt.BINDING_LAYER]
            for row, (clip, index) in enumerate(zip(packed, indices)):
                first, end = clip.visual_span
                values = tt.head_values(attention, tt.OBJECT_HEAD, hidden[row, first:end])
                at = torch.tensor(clip.first_answer_at)
                weights = tt.head_scores(attention, tt.OBJECT_HEAD, hidden[row], cos[row], sin[row], at,
                                         slice(first, end)).softmax(-1)  # [Q, V]
                guesses = logits[row, at].argmax(-1)
                for q, question in enumerate(pool.questions[index]):
                    record = found[question.type]
                    record["output"].append(weights[q] @ values)
                    record["answer"].append(clip.first_answer_ids[q])
                    record["right"].append(int(guesses[q]) == clip.first_answer_ids[q])
                    targets = clip.binding_targets[q]
                    if targets is not None and targets.any():
                        record["log_mass"].append(math.log(float(weights[q][targets].sum()) + 1e-12))
    return found


def readable(outputs: torch.Tensor, answers: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy (every fourth example) of a linear classifier from outputs to answers."""
    classes, labels = answers.unique(return_inverse=True)
    held = torch.arange(len(labels)) % 4 == 0
    mean, std = outputs[~held].mean(0), outputs[~held].std(0) + 1e-5
    x = (outputs - mean) / std
    layer = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(layer(x[~held]), labels[~held]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((layer(x[held]).argmax(-1) == labels[held]).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.probe_heads", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a vidsieve-tiny folder trained by `vidsieve train tiny`")
    parser.add_argument("--clips", type=int, default=960, help="training-split clips of the QA pool to read")
    parser.add_argument("--pool-cache", help="the folder `vidsieve train tiny --pool-cache` keeps pools in")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VLM.from_pretrained(args.model, device="cpu")
    model.eval()
    # With a cache, the pool a training run kept there (its first clips are read); without,
    # just the clips asked for are rendered and encoded.
    size = tt.TrainConfig().qa_pool_clips if args.pool_cache else args.clips
    pool = tt.encode_pool_cached(model, "train", tt.QA_FIRST_CLIP, size, cache=args.pool_cache)
    found = head_outputs(model, pool, min(args.clips, len(pool)))
    print(f"{'type':<16}{'questions':>10}{'mass':>8}{'readable':>10}{'model':>8}")
    for kind in sorted(found):
        record = found[kind]
        mass = math.exp(sum(record["log_mass"]) / len(record["log_mass"])) if record["log_mass"] else float("nan")
        share = readable(torch.stack(record["output"]), torch.tensor(record["answer"]))
        model_acc = sum(record["right"]) / len(record["right"])
        print(f"{kind:<16}{len(record['answer']):>10}{mass:>8.2f}{share:>10.2f}{model_acc:>8.2f}")


if __name__ == "__main__":
    main()
