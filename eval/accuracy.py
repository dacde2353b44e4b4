"""Accuracy benchmark: any model x any compressor specs over a multiple-choice manifest.

Manifests in three layouts load into one `QAItem` list:
- `shapesworld`: our generator's manifest.json, a list of
  {"video", "question", "candidates", "answer" (candidate text), "type"} (MVBench-like);
- `mvbench`: MVBench task files, each a list of {"video", "question", "candidates", "answer"};
  a folder of task files gives one question type per file (the task name);
- `videomme`: Video-MME rows {"videoID", "question_id", "task_type", "question",
  "options": ["A. ...", ...], "answer": "A"} as parquet, JSON or JSONL; videos are
  `<videoID>.mp4` in the video folder.

Each video is decoded and encoded once; every compressor spec then answers every question
about it from the same visual tokens, so accuracy and prefill time are compared on equal
inputs in one run. The chosen option is extracted from free text (`extract_choice`). A
compressor that draws (`random`) draws with each video's own seed (`clip_seed`).
"""

from __future__ import annotations

import json
import re
import statistics
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from compressors import parse_spec
from kernels.errors import VidsieveError
from streaming import SamplingPlan, open_video
from vlm.encoder import PatchReuseEncoder
from vlm.reuse import ReuseSpec

LETTERS = "ABCDEFGHIJ"
FORMATS = ("shapesworld", "mvbench", "videomme")


class ManifestError(VidsieveError):
    """A manifest that cannot be read as any supported benchmark layout."""


@dataclass(frozen=True)
class QAItem:
    id: str
    video: Path
    question: str
    candidates: tuple[str, ...]
    answer_index: int  # index into candidates
    type: str


# --- loading ------------------------------------------------------------------------------------

def load_manifest(path: str | Path, fmt: str = "auto", video_root: str | Path | None = None) -> list[QAItem]:
    """Read a manifest; videos are resolved against `video_root` (default: the manifest's folder)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {str(path)!r} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ManifestError(f"unknown manifest format {fmt!r}; choose from {', '.join(FORMATS)}")
    root = Path(video_root) if video_root else (path if path.is_dir() else path.parent)
    if fmt == "videomme":
        return [videomme_item(row, root) for row in read_rows(path)]
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    items = []
    for file in files:
        task = file.stem if fmt == "mvbench" else None
        for number, row in enumerate(read_rows(file)):
            items.append(candidate_item(row, root, task, f"{file.stem}_{number}"))
    return items


def detect_format(path: Path) -> str:
    if path.is_dir() or path.suffix == ".parquet":
        return "mvbench" if path.is_dir() else "videomme"
    first = read_rows(path)[:1]
    if first and "options" in first[0]:
        return "videomme"
    return "shapesworld" if first and "type" in first[0] else "mvbench"


def read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            try:
                import pandas
            except ImportError:
                raise ManifestError("reading parquet needs pandas and pyarrow: pip install pandas pyarrow") from None
            return pandas.read_parquet(path).to_dict(orient="records")
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read manifest {str(path)!r}: {error}") from None
    if not isinstance(rows, list):
        raise ManifestError(f"manifest {str(path)!r} must hold a list of questions")
    return rows


def candidate_item(row: dict, root: Path, task: str | None, fallback_id: str) -> QAItem:
    try:
        candidates = tuple(str(c) for c in row["candidates"])
        return QAItem(id=str(row.get("id", fallback_id)), video=root / row["video"], question=row["question"],
                      candidates=candidates, answer_index=candidates.index(str(row["answer"])),
                      type=task or row.get("type", "all"))
    except (KeyError, ValueError) as error:
        raise ManifestError(f"bad manifest row {fallback_id}: {error!r}") from None


def videomme_item(row: dict, root: Path) -> QAItem:
    try:
        options = [re.sub(r"^[A-J][.)]\s*", "", str(option)) for option in row["options"]]
        video = root / f"{row['videoID']}.mp4"
        return QAItem(id=str(row["question_id"]), video=video, question=row["question"],
                      candidates=tuple(options), answer_index=LETTERS.index(str(row["answer"]).strip()),
                      type=str(row.get("task_type", "all")))
    except (KeyError, ValueError) as error:
        raise ManifestError(f"bad Video-MME row {row.get('question_id', '?')}: {error!r}") from None


# --- answers ------------------------------------------------------------------------------------

def extract_choice(text: str, candidates: tuple[str, ...] | list[str]) -> int | None:
    """Which candidate a free-text answer chose, or None when it chose none or several.

    Accepts the candidate's text ("red", "The answer is red."), an option letter ("B",
    "(B)", "B.", "Answer: B", "option B"), or both ("B. red"). Whole words only.
    """
    normalised = " ".join(re.findall(r"[\w-]+", text.lower()))
    names = [" ".join(re.findall(r"[\w-]+", c.lower())) for c in candidates]
    if normalised in names:
        return names.index(normalised)
    letter = re.match(r"^\s*(?:the\s+)?(?:answer|option)?\s*(?:is)?\s*[:\s]*\(?([A-J])\)?(?:[.):\s]|$)", text,
                      flags=re.IGNORECASE)
    if letter and (len(text.strip()) <= 3 or text.strip()[1:2] in ".):" or letter.group(0).strip()[:1] in "(aAoO"):
        index = LETTERS.index(letter.group(1).upper())
        if index < len(candidates):
            return index
    found = [i for i, name in enumerate(names) if name and re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", normalised)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:  # a longer name containing a shorter one ("top-left" vs "left") wins
        longest = max(found, key=lambda i: len(names[i]))
        if all(names[i] in names[longest] for i in found):
            return longest
    return None


def options_prompt(item: QAItem) -> str:
    lines = [item.question, "Options:"]
    lines += [f"({LETTERS[i]}) {c}" for i, c in enumerate(item.candidates)]
    lines.append("Answer with the option's letter from the given choices directly.")
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------

@dataclass
class SpecResult:
    spec: str
    correct: dict  # type -> count
    total: dict
    chance: dict  # type -> summed 1/len(candidates)
    prefill_s: list
    kept: list  # visual tokens after compression, per question
    before: list

    def accuracy(self, kind: str | None = None) -> float:
        if kind is None:
            return sum(self.correct.values()) / max(1, sum(self.total.values()))
        return self.correct[kind] / max(1, self.total[kind])


def clip_seed(video: Path) -> int:
    """The compression seed of one video: a hash of its file name. A compressor that draws
    (`random`) then keeps another subset in every clip, as it does for a user's videos, and
    the same one on every rerun. One seed for every clip would keep the same token positions
    in all of them, and the benchmark would score that one mask, not the method."""
    return zlib.crc32(Path(video).name.encode()) & 0x7FFFFFFF


def run_accuracy(model, items: list[QAItem], specs: list[str], *, plan: SamplingPlan | None = None,
                 with_options: bool = False, max_new_tokens: int = 32, reuse: ReuseSpec = ReuseSpec(),
                 progress=None) -> dict[str, SpecResult]:
    """Answer every item under every spec (greedy); one decode + encode per video.

    `reuse.patches` encodes with the patch-reuse encoder; `reuse.kv` prefills each video once
    per spec for specs that allow it (question-agnostic, pre-LLM) and answers every question
    from that KV (prefill time is then the question's own)."""
    parsed = [parse_spec(text) for text in specs]
    sampling = model.default_sampling(max_new_tokens)
    plan = plan or SamplingPlan(num_frames=model.config.num_frames)
    results = {spec.text: SpecResult(spec.text, defaultdict(int), defaultdict(int), defaultdict(float), [], [], [])
               for spec in parsed}
    by_video: dict[Path, list[QAItem]] = defaultdict(list)
    for item in items:
        by_video[item.video].append(item)
    for video, video_items in by_video.items():
        clip = open_video(video, plan).read_all()
        encoder = (PatchReuseEncoder(model.encoder, threshold=reuse.threshold, refresh_every=reuse.refresh_every)
                   if reuse.patches else None)
        tokens = model.encode_frames(np.stack([f.rgb for f in clip]), [f.timestamp_s for f in clip], encoder)
        seeded = replace(sampling, seed=clip_seed(video))
        prefilled = {spec.text: model.prefill_video(tokens, spec, seed=seeded.seed) for spec in parsed
                     if reuse.kv and model.shares_video_kv(spec)}
        for item in video_items:
            prompt = options_prompt(item) if with_options else item.question
            for spec in parsed:
                timings: dict = {}
                if spec.text in prefilled:
                    answer = answer_from(model, prefilled[spec.text], prompt, seeded, timings)
                else:
                    answer = model.answer_tokens(tokens, prompt, spec, seeded, timings)
                result = results[spec.text]
                chosen = extract_choice(answer.text, item.candidates)
                result.correct[item.type] += int(chosen == item.answer_index)
                result.total[item.type] += 1
                result.chance[item.type] += 1 / len(item.candidates)
                result.prefill_s.append(timings["prefill"])
                result.kept.append(answer.visual_after)
                result.before.append(answer.visual_before)
            if progress:
                progress.update(1)
    return results


def answer_from(model, video, prompt: str, sampling, timings: dict) -> SimpleNamespace:
    ids = list(model.stream_reused(video, prompt, sampling, timings))
    return SimpleNamespace(text=model.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                           visual_before=video.visual_before, visual_after=video.visual_after)


def summarise(results: dict[str, SpecResult]) -> dict:
    """JSON-ready summary; prefill times as a ratio to `none` when it was run."""
    baseline = results.get("none")
    base_prefill = statistics.median(baseline.prefill_s) if baseline else None
    summary = {}
    for text, result in results.items():
        kinds = sorted(result.total)
        prefill = statistics.median(result.prefill_s)
        summary[text] = {
            "overall": round(result.accuracy(), 4),
            "questions": sum(result.total.values()),
            "chance": round(sum(result.chance.values()) / max(1, sum(result.total.values())), 4),
            "per_type": {k: {"accuracy": round(result.accuracy(k), 4), "correct": result.correct[k],
                             "total": result.total[k], "chance": round(result.chance[k] / result.total[k], 4)}
                         for k in kinds},
            "visual_tokens_kept": round(statistics.mean(result.kept), 1),
            "visual_tokens_before": round(statistics.mean(result.before), 1),
            "prefill_s_median": round(prefill, 5),
            "prefill_ratio_to_none": round(prefill / base_prefill, 3) if base_prefill else None,
        }
    return summary


def markdown_table(summary: dict) -> str:
    kinds = sorted({k for entry in summary.values() for k in entry["per_type"]})
    header = ["compressor", "tokens kept", "overall", *kinds, "prefill vs none"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec, entry in summary.items():
        cells = [f"`{spec}`", f"{entry['visual_tokens_kept']:g} / {entry['visual_tokens_before']:g}",
                 f"{100 * entry['overall']:.1f}"]
        cells += [f"{100 * entry['per_type'][k]['accuracy']:.1f}" if k in entry["per_type"] else "–" for k in kinds]
        ratio = entry["prefill_ratio_to_none"]
        cells.append(f"{ratio:.2f}x" if ratio is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(summary.values()))
    counts = ", ".join(f"{k} {first['per_type'][k]['total']} (chance {100 * first['per_type'][k]['chance']:.0f}%)"
                       for k in kinds if k in first["per_type"])
    lines.append("")
    lines.append(f"Questions per type: {counts}; overall chance {100 * first['chance']:.1f}%.")
    return "\n".join(lines)
