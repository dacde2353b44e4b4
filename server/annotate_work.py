"""What an annotation job works on, and the part of the work that runs in decode workers.

    collect_work(inputs, manifests, questions)   # files, folders, globs, manifests -> [WorkItem]
    prepare_clip(item, settings, ok, errors)     # on a worker: hash, skip what is done, decode

An answer's id is a hash of (video content, question, model, compressor), so a renamed or
copied video keeps its answers and a changed one gets new ones. `prepare_clip` runs in worker
processes and Ray tasks; it hashes the file, drops the questions whose ids are already in
the output, and decodes the frames only when some question is left.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.errors import VidsieveError
from streaming import SamplingPlan, open_video

# Folders and glob patterns select files with these extensions; a file named on its own is
# always taken (and becomes an error record if it is not a video).
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".3gp", ".ogv", ".h264", ".h265", ".hevc", ".y4m",
})
MANIFEST_FORMATS = (".jsonl", ".csv", ".json")


class AnnotateInputError(VidsieveError):
    """An input that names no video, a malformed manifest, or a video with no question."""


@dataclass(frozen=True)
class WorkItem:
    """One video and the questions to ask about it."""

    video: str
    questions: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def collect_work(inputs: Sequence[str | os.PathLike], manifests: Sequence[str | os.PathLike],
                 questions: Sequence[str]) -> list[WorkItem]:
    """Expand inputs into work items, in the order given; a video listed twice is asked once.

    inputs: video files, folders (searched recursively for VIDEO_EXTENSIONS) or glob patterns
        (`**` recurses); each gets `questions`.
    manifests: JSONL, CSV or JSON-list files of rows `{"video": path, "question": text}` (or
        `"questions": [...]`); a row without a question gets `questions`. Relative video paths
        are relative to the manifest's folder.
    """
    asked: dict[str, list[str]] = {}

    def ask(video: str, texts: Iterable[str]) -> None:
        wanted = asked.setdefault(os.path.normpath(video), [])
        wanted.extend(text for text in texts if text not in wanted)

    for entry in inputs:
        for video in expand_input(os.fspath(entry)):
            ask(video, questions)
    for manifest in manifests:
        for video, own_questions in read_manifest(Path(manifest)):
            ask(video, own_questions or questions)
    if not asked:
        raise AnnotateInputError("no videos to annotate: give video files, folders, glob patterns or --manifest")
    unasked = [video for video, texts in asked.items() if not texts]
    if unasked:
        more = f" and {len(unasked) - 1} more videos" if len(unasked) > 1 else ""
        raise AnnotateInputError(f"no question for {unasked[0]!r}{more}: pass --question or give each manifest "
                                 "row a question")
    return [WorkItem(video, tuple(texts)) for video, texts in asked.items()]


def expand_input(entry: str) -> list[str]:
    """A folder or glob pattern -> the video files it holds, sorted; any other path -> itself."""
    if os.path.isdir(entry):
        found = sorted(str(path) for path in Path(entry).rglob("*") if is_video_file(path))
        if not found:
            raise AnnotateInputError(f"folder {entry!r} holds no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
        return found
    if glob.has_magic(entry) and not os.path.exists(entry):
        found = sorted(path for path in glob.glob(entry, recursive=True) if is_video_file(Path(path)))
        if not found:
            raise AnnotateInputError(f"pattern {entry!r} matches no video file")
        return found
    return [entry]  # a missing or broken file becomes an error record, like any bad video


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file()


def read_manifest(path: Path) -> list[tuple[str, list[str]]]:
    """(video path, its own questions) per row of a JSONL, CSV or JSON-list manifest."""
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_FORMATS:
        raise AnnotateInputError(f"manifest {str(path)!r}: unknown format {suffix!r}; "
                                 f"use {', '.join(MANIFEST_FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AnnotateInputError(f"cannot read manifest {str(path)!r}: {error}") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "video" not in (reader.fieldnames or []):
            raise AnnotateInputError(f"manifest {str(path)!r}: the CSV header needs a 'video' column")
        rows = [(number, dict(row)) for number, row in enumerate(reader, start=2)]
    elif suffix == ".jsonl":
        rows = [(number, _parse_json(line, path, number)) for number, line in enumerate(text.splitlines(), start=1)
                if line.strip()]
    else:
        listing = _parse_json(text, path, None)
        if not isinstance(listing, list):
            raise AnnotateInputError(f"manifest {str(path)!r}: a .json manifest must be a list of rows")
        rows = list(enumerate(listing, start=1))
    return [_manifest_row(row, path, number) for number, row in rows]


def _parse_json(text: str, path: Path, line: int | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line}" if line is not None else "it"
        raise AnnotateInputError(f"manifest {str(path)!r}: {where} is not JSON ({error.msg})") from None


def _manifest_row(row, path: Path, number: int) -> tuple[str, list[str]]:
    where = f"manifest {str(path)!r} row {number}"
    if not isinstance(row, dict) or not isinstance(row.get("video"), str) or not row["video"].strip():
        raise AnnotateInputError(f"{where}: needs a 'video' path")
    questions = row.get("questions", [])
    if isinstance(row.get("question"), str) and row["question"].strip():
        questions = [row["question"], *questions]
    if not isinstance(questions, list) or not all(isinstance(text, str) for text in questions):
        raise AnnotateInputError(f"{where}: 'questions' must be a list of strings")
    return str(path.parent / row["video"].strip()), [text for text in questions if text.strip()]


# ----------------------------------------------------------------------------------------------
# Ids
# ----------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_key(sha256: str, question: str, model: str, compressor: str) -> str:
    """Stable id of one answer (16 hex digits): the same video content, question, model and compressor."""
    text = json.dumps([sha256, question, model, compressor])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class IdSet:
    """A set of record ids stored as sorted 64-bit integers (each id is 16 hex digits).

    Eight bytes an id: a million finished records reach every worker process or Ray task as an
    8 MB array rather than a 100 MB Python set.
    """

    def __init__(self, ids: Iterable[str] = ()):
        self._sorted = np.unique(np.fromiter((int(record_id, 16) for record_id in ids), dtype=np.uint64))

    def __contains__(self, record_id: str) -> bool:
        value = np.uint64(int(record_id, 16))
        at = int(np.searchsorted(self._sorted, value))
        return at < len(self._sorted) and self._sorted[at] == value

    def __len__(self) -> int:
        return len(self._sorted)


# ----------------------------------------------------------------------------------------------
# On a worker
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSettings:
    """What a worker needs to name answers and decode a clip."""

    model: str  # the model's display name, part of every id
    compressor: str  # canonical spec text, part of every id
    plan: SamplingPlan


@dataclass
class PreparedClip:
    """A video hashed and, when it has questions left, decoded; what a worker hands the model."""

    video: str
    sha256: str  # "" when the file could not be read
    pending: list[tuple[str, str]]  # (record id, question) still to answer
    skipped_ok: int  # questions whose ok record is already in the output
    skipped_errors: int  # questions whose error record is already in the output (no --retry-failed)
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3]
    timestamps_s: list[float] | None = None  # [T] presentation times
    decode_s: float = 0.0
    error: str | None = None  # why the video could not be read or decoded


def prepare_clip(item: WorkItem, settings: PrepareSettings, ok_ids: IdSet, skip_error_ids: IdSet, *,
                 folder: str | None = None) -> PreparedClip:
    """Hash the video, keep the questions not yet answered, decode the frames if any are left.

    folder: where a relative `item.video` lives when this runs elsewhere (a Ray node); records
        keep `item.video` as given.
    """
    path = os.path.join(folder, item.video) if folder else item.video
    try:
        sha256, error = file_sha256(path), None
    except OSError as os_error:
        sha256, error = "", f"cannot read {path!r}: {os_error.strerror or os_error}"
    clip = PreparedClip(item.video, sha256, [], 0, 0, error=error)
    for question in item.questions:
        record_id = record_key(sha256, question, settings.model, settings.compressor)
        if record_id in ok_ids:
            clip.skipped_ok += 1
        elif record_id in skip_error_ids:
            clip.skipped_errors += 1
        else:
            clip.pending.append((record_id, question))
    if not clip.pending or clip.error is not None:
        return clip
    start = time.perf_counter()
    try:
        frames = open_video(path, settings.plan).read_all()
        clip.frames = np.stack([frame.rgb for frame in frames])
        clip.timestamps_s = [frame.timestamp_s for frame in frames]
    except VidsieveError as decode_error:
        clip.error = str(decode_error)
    clip.decode_s = time.perf_counter() - start
    return clip
