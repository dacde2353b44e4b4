"""The batch annotation job: answer questions about many videos, one JSON line per answer.

    decode workers (processes)                   main process
    item -> hash, skip done, decode -> clip  ──►  model.answer per question -> records -> log

Workers hash and decode videos in parallel (`workers` processes, a bounded number of clips in
flight) while the main process runs the model, so decoding overlaps inference. The model
answers one (video, question) at a time: the LM runner takes one sequence, and batching the
vision encoder over several clips measured no faster on CPU (docs/BENCHMARKS.md).
`server/annotate_ray.py` runs the same stages on Ray Data; both hand their results to
`write_results`, the only writer of the output (see `server/annotate_log.py` for how each
record lands exactly once).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from compressors import CompressorSpec
from kernels.errors import VidsieveError
from server.annotate_log import AnnotationLog
from server.annotate_work import IdSet, PreparedClip, PrepareSettings, WorkItem, prepare_clip
from streaming import SamplingPlan
from vlm.lm_runner import SamplingParams
from vlm.encoder import PatchReuseEncoder
from vlm.model import VLM
from vlm.reuse import ReuseSpec

CLIPS_IN_FLIGHT_PER_WORKER = 2  # decoded clips waiting for the model: bounds memory, keeps it busy


@dataclass
class AnnotateJob:
    items: list[WorkItem]
    out: Path
    spec: CompressorSpec
    plan: SamplingPlan
    max_new_tokens: int = 32
    overwrite: bool = False
    retry_failed: bool = False  # redo error records (ok records are never redone)
    reuse: ReuseSpec = ReuseSpec()


@dataclass
class ClipResult:
    """The new records for one video, and how many of its questions were already answered."""

    records: list[dict]
    skipped_ok: int
    skipped_errors: int


@dataclass
class Summary:
    ok: int = 0  # records written by this job
    failed: int = 0
    skipped: int = 0  # answers already in the output (ok or error)
    skipped_errors: int = 0  # of those, error records (`--retry-failed` redoes them)
    videos: int = 0  # videos this job decoded and answered (not wholly skipped)
    elapsed_s: float = 0.0

    @property
    def videos_per_s(self) -> float:
        return self.videos / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def has_errors(self) -> bool:
        """Whether any answer this job covers is an error record, new or left from before."""
        return bool(self.failed or self.skipped_errors)

    def describe(self) -> str:
        earlier = f" ({self.skipped_errors} of them errors: --retry-failed redoes them)" if self.skipped_errors else ""
        return (f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped{earlier} in {self.elapsed_s:.1f}s "
                f"({self.videos} videos, {self.videos_per_s:.2f} videos/s)")


def run_annotation(model: VLM, job: AnnotateJob, *, workers: int = 2, threads: int | None = None,
                   progress: bool = True) -> Summary:
    """Annotate on this machine: `workers` decode processes (0: decode in this process).

    threads: torch CPU threads for the model, by default the cores the workers leave free.
    More threads than free cores makes a CPU model many times slower, not faster.
    """
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, available_cores() - workers))
    try:
        with AnnotationLog(job.out, overwrite=job.overwrite) as log:
            settings = PrepareSettings(answering_model_name(model), job.spec.text, job.plan)
            ok_ids, skip_error_ids = finished_ids(log, job.retry_failed)
            clips = prepare_in_workers(job.items, settings, ok_ids, skip_error_ids, workers)
            results = (ClipResult(answer_clip(model, clip, job.spec, job.max_new_tokens, job.reuse), clip.skipped_ok,
                                  clip.skipped_errors) for clip in clips)
            return write_results(log, results, total_videos=len(job.items), started=started, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def answering_model_name(model: VLM) -> str:
    """The model as records and ids name it: its display name, plus its attention when that is
    not dense (bi-level routing attention gives different answers)."""
    attention = str(model.runner.attention_spec)
    return model.display_name if attention == "dense" else f"{model.display_name}, attention {attention}"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def finished_ids(log: AnnotationLog, retry_failed: bool) -> tuple[IdSet, IdSet]:
    """Ids to skip: ok records always, error records unless they are to be retried."""
    return IdSet(log.ids_with_status("ok")), IdSet([] if retry_failed else log.ids_with_status("error"))


def write_results(log: AnnotationLog, results: Iterable[ClipResult], *, total_videos: int, started: float,
                  progress: bool) -> Summary:
    """Append every new record, count, and show a progress bar over videos (rate and ETA)."""
    summary = Summary()
    bar = tqdm(total=total_videos, desc="annotate", unit="video", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for result in results:
        for record in result.records:
            if log.written(record["id"]):  # the same content under a second path: answered once
                summary.skipped += 1
                continue
            log.append(record)
            if record["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
        summary.skipped += result.skipped_ok + result.skipped_errors
        summary.skipped_errors += result.skipped_errors
        summary.videos += bool(result.records)
        bar.set_postfix(ok=summary.ok, failed=summary.failed, skipped=summary.skipped, refresh=False)
        bar.update(1)
    bar.close()
    summary.elapsed_s = time.perf_counter() - started
    return summary


# ----------------------------------------------------------------------------------------------
# Decode workers
# ----------------------------------------------------------------------------------------------


def prepare_in_workers(items: list[WorkItem], settings: PrepareSettings, ok_ids: IdSet, skip_error_ids: IdSet,
                       workers: int) -> Iterator[PreparedClip]:
    """Prepared clips in the order workers finish them, at most a few per worker in flight."""
    if workers <= 0:
        yield from (prepare_clip(item, settings, ok_ids, skip_error_ids) for item in items)
        return
    # Fork where there is one: workers only hash and decode (no torch), and start in
    # milliseconds instead of re-importing torch as spawned processes would.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(os.getpid(), settings, ok_ids, skip_error_ids))
    pending = iter(items)
    in_flight: set[Future] = set()
    try:
        while True:
            while len(in_flight) < CLIPS_IN_FLIGHT_PER_WORKER * workers and (item := next(pending, None)):
                in_flight.add(pool.submit(_prepare_in_worker, item))
            if not in_flight:
                return
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_worker_job: tuple[PrepareSettings, IdSet, IdSet] | None = None


def _start_worker(parent_pid: int, settings: PrepareSettings, ok_ids: IdSet, skip_error_ids: IdSet) -> None:
    global _worker_job
    _worker_job = (settings, ok_ids, skip_error_ids)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    """A killed job's idle workers wait on a queue nobody feeds; leave when the parent is gone."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _prepare_in_worker(item: WorkItem) -> PreparedClip:
    return prepare_clip(item, *_worker_job)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def answer_clip(model: VLM, clip: PreparedClip, spec: CompressorSpec, max_new_tokens: int,
                reuse: ReuseSpec = ReuseSpec()) -> list[dict]:
    """One record per pending question; a clip that failed to decode gives error records.

    The clip is encoded once for all its questions. With `reuse.patches` the encoder skips
    unchanged patches; with `reuse.kv` the video is prefilled once and every question reuses
    its KV. Records then carry `reuse`: what was skipped.
    """
    base = {"video": clip.video, "sha256": clip.sha256, "model": answering_model_name(model), "compressor": spec.text}
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(model.tokenizer.eos_token_id,))
    records, tokens, video, reused, shared_timings = [], None, None, {}, {}
    for record_id, question in clip.pending:
        # Every record has every field; an error record has nulls where nothing was computed.
        record = dict(base, id=record_id, question=question, answer=None, status="error", error=clip.error,
                      frames=0 if clip.frames is None else len(clip.frames), visual_tokens=None,
                      timings={"decode": round(clip.decode_s, 4)})
        if clip.error is not None:
            records.append(record)
            continue
        try:
            if tokens is None:  # once per clip; every record reports the shared encode (and video prefill)
                tokens, video, reused = encode_for_questions(model, clip, spec, reuse, shared_timings)
            timings: dict = {"decode": clip.decode_s, **shared_timings}
            if video is not None:
                ids = list(model.stream_reused(video, question, sampling, timings))
                text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
                before, after = video.visual_before, video.visual_after
            else:
                answer = model.answer_tokens(tokens, question, spec, sampling, timings)
                text, before, after = answer.text, answer.visual_before, answer.visual_after
        except VidsieveError as error:
            records.append(dict(record, error=str(error)))
            continue
        except Exception as error:  # a bug must not kill a thousand-video job; keep the trace
            traceback.print_exc(file=sys.stderr)
            records.append(dict(record, error=f"internal error: {type(error).__name__}: {error}"))
            continue
        ok = dict(record, status="ok", answer=text, visual_tokens={"before": before, "after": after},
                  timings={name: round(seconds, 4) for name, seconds in timings.items()})
        records.append(dict(ok, reuse=reused) if reused else ok)
    return records


def encode_for_questions(model: VLM, clip: PreparedClip, spec: CompressorSpec, reuse: ReuseSpec, timings: dict):
    """Encode a clip once (skipping unchanged patches if asked) and, with KV reuse, prefill the
    video once. Returns (visual tokens, prefilled video or None, what reuse skipped)."""
    start = time.perf_counter()
    encoder = None
    if reuse.patches:
        encoder = PatchReuseEncoder(model.encoder, threshold=reuse.threshold, refresh_every=reuse.refresh_every)
    tokens = model.encode_frames(clip.frames, clip.timestamps_s, encoder)
    timings["encode"] = time.perf_counter() - start
    reused = {"spec": str(reuse)} if reuse.kv or reuse.patches else {}
    if encoder is not None:
        reused["patches_skipped"] = round(encoder.stats.skipped_fraction, 4)
    video = None
    if reuse.kv:
        start = time.perf_counter()
        video = model.prefill_video(tokens, spec)
        timings["video_prefill"] = time.perf_counter() - start
        reused["video_prefills"] = 1
        reused["questions_sharing_it"] = len(clip.pending)
    return tokens, video, reused
