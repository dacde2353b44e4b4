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
compressor's wrong answers as over-counts, under-counts and answers that say no number. Each
clip is compressed with its own seed, as `vidsieve bench accuracy` does.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from compressors import parse_spec
from eval import shapesworld as sw
from eval.accuracy import extract_choice
from eval.answer_in_view import answer_shown, ask, model_and_manifest, rows_by_clip, split_parser
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
    weights = count_targets(facts, question, tokens)  # [len(tokens)]
    dropped = ~torch.isin(kept_cells(tokens), kept_cells(kept))
    return int(weights[dropped].sum())


def breakdown(model: VLM, manifest: Path, spec_text: str) -> dict:
    """{split name: {row: {"questions", "none", VERDICTS...}}} over the counting questions."""
    rows = [row for row in json.loads(manifest.read_text()) if row["type"] == "counting"]
    table: dict = defaultdict(lambda: defaultdict(lambda: dict.fromkeys(("questions", "none", *VERDICTS), 0)))
    longest_brief = sw.BRIEF_LIFE_FRAMES[1]
    for row, question, clip in rows_by_clip(model, manifest, rows, parse_spec(spec_text)):
        said = {key: verdict(ask(model, video_kv, row["question"]), row["candidates"], row["answer"])
                for key, video_kv in clip.prefilled.items()}
        long_lived = all(clip.scene.present[i].sum() > longest_brief for i in question.object_ids)
        shown = answer_shown(question, clip.kept, clip.owners, clip.facts)
        cells = {
            "counted objects": str(len(question.object_ids)),
            "lives": "all longer than brief" if long_lived else "a brief one",
            "in view": "shown" if shown else "hidden",
        }
        if shown:
            dropped = dropped_targets(clip.facts, question, clip.tokens, clip.kept)
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
    args = split_parser(__doc__).parse_args(argv)
    model, manifest = model_and_manifest(args)
    for spec_text in args.spec:
        print(markdown(spec_text, breakdown(model, manifest, spec_text)), flush=True)


if __name__ == "__main__":
    main()
