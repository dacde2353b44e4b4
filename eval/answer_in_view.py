"""Accuracy under a compressor, split by whether the kept tokens still show each answer.

    python -m eval.answer_in_view --model vidsieve-tiny --spec random:ratio=0.25 --count 200

A compressor can cost accuracy two ways: it drops the tokens that hold the answer (no model
could answer then), or the model fails on what is left (a robustness gap). For each ShapesWorld
test question this reads, from the generator's scene state, whether the tokens the compressor
kept still show its answer, with the rules training uses (`eval.train_tiny`):

- fine detail: a kept token at the object's centre in a frame where its dot shows (`dot_is_kept`);
- temporal order: every option in view, the winner's first (last) kept frame ahead of the
  others' (`order_is_kept`);
- counting: every counted object covered by a kept token in some frame (`count_targets`);
- the rest: the object covered by a kept token (in the frame the question names, if any).

Then it reports, per type and for each side, how many questions, and their accuracy with the
compressor and with `none` (the same questions). Each clip is compressed with its own seed
(`eval.accuracy.clip_seed`), as `vidsieve bench accuracy` does.

`--counting-ceiling` also scores a perfect counter of the kept tokens (`counting_ceiling`): the
most a model can get right on counting questions from what a compressor left.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressors import CompressionContext, VisualTokens, parse_spec
from eval import shapesworld as sw
from eval.accuracy import clip_seed, extract_choice
from eval.train_tiny import (FACT_COUNT, binding_masks, count_targets, dot_is_kept, kept_cells, object_facts,
                             order_is_kept, render_clip, token_owners)
from streaming import SamplingPlan, open_video
from vlm.model import VLM


def answer_shown(question: sw.Question, kept: VisualTokens, owners: torch.Tensor, facts: torch.Tensor) -> bool:
    """Whether `kept` still shows `question`'s answer (the rules in the module docstring)."""
    present = token_owners(kept, owners)
    if question.type == "fine_detail":
        return dot_is_kept(facts, question.object_ids[0], kept)
    if question.type == "temporal_order":
        return order_is_kept(question, kept, present)
    if question.type == "counting":
        return count_targets(facts, question, kept, present) is not None
    return bool(binding_masks(kept, owners, [question])[0].any())


def kept_of_clip(model: VLM, manifest: Path, row: dict, spec) -> tuple:
    """The scene, questions, token owners, object facts and tokens of the clip of manifest row
    `row`, and the tokens `spec` keeps of it (with the clip's seed, as the harness compresses)."""
    video = row["video"]
    scene, questions = sw.scene_and_questions(row["split"], row["index"])
    block_px = model.encoder.patch_size * model.projector.merge
    _, _, owners = render_clip(row["split"], row["index"], block_px)
    facts = torch.as_tensor(object_facts(scene, block_px))
    frames = open_video(manifest.parent / video, SamplingPlan(num_frames=model.config.num_frames)).read_all()
    tokens = model.encode_frames(np.stack([f.rgb for f in frames]), [f.timestamp_s for f in frames])
    seed = clip_seed(manifest.parent / video)
    kept = spec.compressor.compress(tokens, CompressionContext(question="", budget=spec.budget, seed=seed, model=model))
    return scene, questions, torch.as_tensor(owners), facts, tokens, kept, seed


def prefill_both(model: VLM, tokens, spec, seed: int) -> dict:
    """The clip's KV through `spec` (with the clip's seed, as the harness) and through `none`."""
    return {"spec": model.prefill_video(tokens, spec, seed=seed),
            "none": model.prefill_video(tokens, parse_spec("none"))}


def ask(model: VLM, video_kv, question: str) -> str:
    """The model's greedy answer to `question` about a prefilled clip."""
    ids = list(model.stream_reused(video_kv, question, model.default_sampling(8)))
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class KeptClip:
    """One clip of a manifest as `rows_by_clip` hands it out (see `kept_of_clip`, `prefill_both`)."""

    scene: sw.Scene
    owners: torch.Tensor  # [T, Gm, Gm] uint8: which objects each merged token shows (bit i: object i)
    facts: torch.Tensor  # `object_facts` of the scene
    tokens: VisualTokens  # every token of the clip
    kept: VisualTokens  # what the compressor kept, with the clip's seed
    prefilled: dict  # {"spec": KV, "none": KV}


def rows_by_clip(model: VLM, manifest: Path, rows: list[dict], spec) -> Iterator[tuple[dict, sw.Question, KeptClip]]:
    """(row, its question, its clip) for each manifest row, clip by clip."""
    for video in dict.fromkeys(row["video"] for row in rows):
        clip_rows = [row for row in rows if row["video"] == video]
        scene, questions, owners, facts, tokens, kept, seed = kept_of_clip(model, manifest, clip_rows[0], spec)
        clip = KeptClip(scene, owners, facts, tokens, kept, prefill_both(model, tokens, spec, seed))
        for row in clip_rows:
            yield row, next(q for q in questions if q.text == row["question"]), clip


def breakdown(model: VLM, manifest: Path, spec_text: str) -> dict:
    """{type: {"shown" | "hidden": {"questions", "correct", "correct_none"}}} over a ShapesWorld manifest."""
    table: dict = defaultdict(lambda: {side: {"questions": 0, "correct": 0, "correct_none": 0}
                                       for side in ("shown", "hidden")})
    for row, question, clip in rows_by_clip(model, manifest, json.loads(manifest.read_text()), parse_spec(spec_text)):
        side = "shown" if answer_shown(question, clip.kept, clip.owners, clip.facts) else "hidden"
        cell = table[row["type"]][side]
        cell["questions"] += 1
        for key, video_kv in (("correct", clip.prefilled["spec"]), ("correct_none", clip.prefilled["none"])):
            text = ask(model, video_kv, row["question"])
            cell[key] += int(extract_choice(text, row["candidates"]) == row["candidates"].index(row["answer"]))
    return dict(sorted(table.items()))


def counted_filter(question: sw.Question) -> dict[str, str]:
    """The attributes a counting question counts by ({} for "objects"), read back from its text
    ("How many red objects ...", "How many circles ...", as the generator writes them)."""
    plurals = {plural: shape for shape, plural in sw.SHAPE_PLURALS.items()}
    words = question.text.rstrip("?").split()
    found = {"shape": plurals[w] for w in words if w in plurals}
    return found | {"colour": w for w in words if w in sw.COLOURS}


def counting_ceiling(model: VLM, manifest: Path, spec_text: str) -> dict:
    """How many counting questions a perfect counter of the kept tokens gets right.

    It sees every object that a kept token covers (or holds the centre of), tells objects
    apart without error, and answers with the number of matching objects in view anywhere
    (ShapesWorld v3 counts over the whole clip). Returns {"questions", "correct"}."""
    spec = parse_spec(spec_text)
    rows = {row["video"]: row for row in json.loads(manifest.read_text())}  # one row per clip
    right = total = 0
    for row in rows.values():
        scene, questions, owners, facts, _, kept, _ = kept_of_clip(model, manifest, row, spec)
        per_frame = kept.grid_thw[1] * kept.grid_thw[2]
        present, cells = token_owners(kept, owners), kept_cells(kept)
        frames = scene.config.frame_count
        for question in (q for q in questions if q.type == "counting"):
            wanted = counted_filter(question)
            matching = [o.object_id for o in scene.objects
                        if all(getattr(o, name) == value for name, value in wanted.items())]
            assert set(question.object_ids) == set(matching), question.text
            in_view = 0
            for object_id in matching:
                centres = facts[object_id, FACT_COUNT + frames:FACT_COUNT + 2 * frames].long()
                at_centre = (centres[kept.frame_index] >= 0) & (cells == kept.frame_index * per_frame
                                                                + centres[kept.frame_index])
                in_view += bool((((present >> object_id) & 1).bool() | at_centre).any())
            total += 1
            right += in_view == len(question.object_ids)
    return {"questions": total, "correct": right}


def ceiling_markdown(spec_text: str, ceiling: dict) -> str:
    accuracy = 100 * ceiling["correct"] / max(1, ceiling["questions"])
    return (f"`{spec_text}`: a perfect counter of the kept tokens gets {ceiling['correct']} of "
            f"{ceiling['questions']} counting questions right ({accuracy:.1f}%)\n")


def markdown(spec_text: str, table: dict) -> str:
    def accuracy(cell: dict, key: str) -> str:
        return f"{100 * cell[key] / cell['questions']:.1f}" if cell["questions"] else "-"

    lines = [f"`{spec_text}`: accuracy with it / with `none`, on the questions whose answer its kept tokens "
             "still show and on those they do not", "",
             "| type | shown: questions | shown: accuracy | shown: with none | hidden: questions | "
             "hidden: accuracy | hidden: with none |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, sides in table.items():
        shown, hidden = sides["shown"], sides["hidden"]
        lines.append(f"| {kind} | {shown['questions']} | {accuracy(shown, 'correct')} "
                     f"| {accuracy(shown, 'correct_none')} "
                     f"| {hidden['questions']} | {accuracy(hidden, 'correct')} | {accuracy(hidden, 'correct_none')} |")
    return "\n".join(lines) + "\n"


def split_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a breakdown over a ShapesWorld split: model, specs, split, clips, threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="vidsieve-tiny")
    parser.add_argument("--spec", action="append", required=True, help="compressor spec (repeatable)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=200, help="clips")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/shapesworld"))
    parser.add_argument("--threads", type=int, default=None)
    return parser


def model_and_manifest(args: argparse.Namespace) -> tuple[VLM, Path]:
    """The model and the split's manifest (written on first use) that `split_parser`'s options name."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return VLM.from_pretrained(args.model, device="cpu"), sw.cached_split(args.split, args.count, args.data_dir)


def main(argv: list[str] | None = None) -> None:
    parser = split_parser(__doc__)
    parser.add_argument("--counting-ceiling", action="store_true",
                        help="also score a perfect counter of the kept tokens (counting_ceiling)")
    args = parser.parse_args(argv)
    model, manifest = model_and_manifest(args)
    for spec_text in args.spec:
        print(markdown(spec_text, breakdown(model, manifest, spec_text)), flush=True)
        if args.counting_ceiling:
            print(ceiling_markdown(spec_text, counting_ceiling(model, manifest, spec_text)), flush=True)


if __name__ == "__main__":
    main()
