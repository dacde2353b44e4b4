"""Where counting goes wrong under a compressor: the ShapesWorld counting questions, split up.

    python -m eval.count_breakdown --model vidsieve-tiny --spec random:ratio=0.25 --count 200

Every counting question of the split is answered with `none` and with the compressor, and the
answers are split four ways:

- by how many objects are counted;
- by whether every counted object lives longer than a brief object (`sw.BRIEF_LIFE_FRAMES`);
- by whether the kept tokens still show every counted object (`answer_in_view.answer_shown`);
- for those, by how many of the tokens the count head is taught with every token kept (an
  object's centre where it first appears, `count_targets`) the compressor dropped.

Each row gives the questions, how many `none` and the compressor answer right, and the
compressor's wrong answers as over-counts, under-counts and answers that say no number. Each clip is compressed with its
own seed, as `vidsieve bench accuracy` does.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from compressors import parse_spec
from eval import shapesworld as sw
from eval.accuracy import extract_choice
from eval.answer_in_view import answer_shown, kept_of_clip
from eval.train_tiny import count_targets, kept_cells
from vlm.model import VLM

VERDICTS = ("right", "over", "under", "other")


def verdict(text: str, candidates: list[str], answer: str) -> str:
    """right, over (a larger number than the answer, a candidate or not), under, or other (no
    number said)."""
    choice = extract_choice(text, candidates)
    words = [candidates[choice]] if choice is not None else re.findall(r"[\w-]+", text.lower())
    said = next((sw.NUMBER_WORDS.index(word) for word in words if word in sw.NUMBER_WORDS), None)
    if said is None:
        return "other"
    truth = sw.NUMBER_WORDS.index(answer)
    return "right" if said == truth else "over" if said > truth else "under"


def dropped_targets(facts: torch.Tensor, question: sw.Question, tokens, kept) -> int:
    """How many counted objects lost the token the count head is taught with every token kept."""
    weights = count_targets(facts, question, tokens)
    kept_set = set(kept_cells(kept).tolist())
    cells = kept_cells(tokens)
    return sum(int(weights[i]) for i in torch.nonzero(weights)[:, 0] if int(cells[i]) not in kept_set)


def breakdown(model: VLM, manifest: Path, spec_text: str) -> dict:
    """{split name: {row: {"questions", "none", VERDICTS...}}} over the counting questions."""
    spec, baseline = parse_spec(spec_text), parse_spec("none")
    rows = [row for row in json.loads(manifest.read_text()) if row["type"] == "counting"]
    sampling = model.default_sampling(8)
    table: dict = defaultdict(lambda: defaultdict(lambda: dict.fromkeys(("questions", "none", *VERDICTS), 0)))
    longest_brief = sw.BRIEF_LIFE_FRAMES[1]
    for video in dict.fromkeys(row["video"] for row in rows):
        clip_rows = [row for row in rows if row["video"] == video]
        scene, questions, owners, facts, tokens, kept, seed = kept_of_clip(model, manifest, clip_rows[0], spec)
        prefilled = {"spec": model.prefill_video(tokens, spec, seed=seed), "none": model.prefill_video(tokens, baseline)}
        for row in clip_rows:
            question = next(q for q in questions if q.text == row["question"])
            said = {}
            for key, video_kv in prefilled.items():
                text = model.tokenizer.decode(list(model.stream_reused(video_kv, row["question"], sampling)),
                                              skip_special_tokens=True).strip()
                said[key] = verdict(text, row["candidates"], row["answer"])
            lives = [int(scene.present[i].sum()) for i in question.object_ids]
            shown = answer_shown(question, kept, owners, facts)
            cells = {
                "counted objects": str(len(question.object_ids)),
                "lives": "all longer than brief" if min(lives, default=99) > longest_brief else "a brief one",
                "in view": "shown" if shown else "hidden",
            }
            if shown:
                dropped = dropped_targets(facts, question, tokens, kept)
                cells["taught tokens dropped (in view)"] = str(dropped) if dropped < 2 else "2 or more"
            for split, value in cells.items():
                cell = table[split][value]
                cell["questions"] += 1
                cell["none"] += said["none"] == "right"
                cell[said["spec"]] += 1
    return {split: dict(sorted(values.items())) for split, values in table.items()}


def markdown(spec_text: str, table: dict) -> str:
    lines = [f"`{spec_text}`: counting questions, right with `none` and with it, and its wrong answers", "",
             "| split | row | questions | right, none | right | over | under | other |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for split, values in table.items():
        for value, cell in values.items():
            lines.append(f"| {split} | {value} | {cell['questions']} | {cell['none']} | {cell['right']} "
                         f"| {cell['over']} | {cell['under']} | {cell['other']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vidsieve-tiny")
    parser.add_argument("--spec", action="append", required=True, help="compressor spec (repeatable)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=200, help="clips")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/shapesworld"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = VLM.from_pretrained(args.model, device="cpu")
    manifest = sw.cached_split(args.split, args.count, args.data_dir)
    for spec_text in args.spec:
        print(markdown(spec_text, breakdown(model, manifest, spec_text)), flush=True)


if __name__ == "__main__":
    main()
