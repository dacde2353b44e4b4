"""The batch annotation job: answer questions about many videos, one JSON line per answer.

Each record is keyed by (content hash, question, model, compressor). Records are appended
whole with one `write` on an O_APPEND descriptor and fsync'ed before they count, so a crash
never leaves a half-written line and a rerun skips what is already done.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from compressors import CompressorSpec
from kernels.errors import VidsieveError
from streaming import SamplingPlan, open_video
from vlm.lm_runner import SamplingParams
from vlm.model import VLM


@dataclass
class AnnotateJob:
    videos: list[Path]
    questions: list[str]
    out: Path
    spec: CompressorSpec
    plan: SamplingPlan
    max_new_tokens: int = 32
    overwrite: bool = False


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0
    videos: int = 0
    records: list[dict] = field(default_factory=list)

    @property
    def videos_per_s(self) -> float:
        return self.videos / self.elapsed_s if self.elapsed_s else 0.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_key(sha256: str, question: str, model: str, compressor: str) -> str:
    """Stable id of one answer: the same video content, question, model and compressor."""
    text = json.dumps([sha256, question, model, compressor])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line atomically and durably (single write, then fsync)."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def finished_ids(path: Path) -> set[str]:
    """Ids of records already written with status ok (a torn last line is ignored)."""
    done: set[str] = set()
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("status") == "ok":
            done.add(record["id"])
    return done


def run_annotation(model: VLM, job: AnnotateJob, *, progress: bool = True) -> Summary:
    if job.overwrite and job.out.exists():
        job.out.unlink()
    job.out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(job.out)
    summary = Summary()
    started = time.perf_counter()
    bar = tqdm(total=len(job.videos) * len(job.questions), desc="annotate", unit="answer",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for video in job.videos:
        for record in annotate_video(model, job, video, done):
            if record is None:
                summary.skipped += 1
            else:
                append_record(job.out, record)
                summary.records.append(record)
                if record["status"] == "ok":
                    summary.ok += 1
                else:
                    summary.failed += 1
            bar.update(1)
        summary.videos += 1
    bar.close()
    summary.elapsed_s = time.perf_counter() - started
    return summary


def annotate_video(model: VLM, job: AnnotateJob, video: Path, done: set[str]) -> Iterable[dict | None]:
    """Yield one record per question (None where it was already done)."""
    try:
        sha256 = file_sha256(video)
    except OSError as error:
        sha256 = ""
        decode_error = f"cannot read {str(video)!r}: {error.strerror or error}"
    else:
        decode_error = None
    base = {"video": str(video), "sha256": sha256, "model": model.display_name, "compressor": job.spec.text}
    pending = []
    for question in job.questions:
        record_id = record_key(sha256, question, model.display_name, job.spec.text)
        if record_id in done:
            yield None
        else:
            pending.append((record_id, question))
    if not pending:
        return

    frames = timestamps = None
    decode_s = 0.0
    if decode_error is None:
        start = time.perf_counter()
        try:
            clip = open_video(video, job.plan).read_all()
            frames = np.stack([frame.rgb for frame in clip])
            timestamps = [frame.timestamp_s for frame in clip]
        except VidsieveError as error:
            decode_error = str(error)
        decode_s = time.perf_counter() - start

    for record_id, question in pending:
        # Every record has every field; an error record has nulls where nothing was computed.
        record = dict(base, id=record_id, question=question, answer=None, status="error", error=decode_error,
                      frames=0 if frames is None else len(frames), visual_tokens=None,
                      timings={"decode": round(decode_s, 4)})
        if decode_error is not None:
            yield record
            continue
        try:
            sampling = SamplingParams(max_new_tokens=job.max_new_tokens,
                                      stop_token_ids=(model.tokenizer.eos_token_id,))
            answer = model.answer(frames, timestamps, question, job.spec, sampling)
        except VidsieveError as error:
            yield dict(record, error=str(error))
            continue
        except Exception as error:  # a bug must not kill a thousand-video job; keep the trace
            traceback.print_exc(file=sys.stderr)
            yield dict(record, error=f"internal error: {type(error).__name__}: {error}")
            continue
        timings = {"decode": decode_s, **answer.timings_s}
        yield dict(record, status="ok", answer=answer.text,
                   visual_tokens={"before": answer.visual_before, "after": answer.visual_after},
                   timings={name: round(seconds, 4) for name, seconds in timings.items()})
