"""Engine: one model, one model thread, many sessions served fairly.

Every live `Session` and every one-shot `ClipAnswer` is a job. The model thread takes jobs
round-robin and runs ONE work item of each in turn: a frame (encode, compress, prefill,
evict), a question's prefill with its first token, or one decode step. So a long stream or a
long answer never holds the model for more than one item while another session waits, and
time to first token under load grows with the number of busy sessions, not with their length.

Decode steps are batched across jobs: when the job whose turn it is waits on a decode step,
every other job waiting on one (and able to take its token) joins it, and `LMRunner.step_batch`
runs them as one [B, 1, D] pass (weights read once for all; attention per sequence over its
own `KVState`, since each session has its own length, evictions and attention spec). Then each
job in the batch takes its token in round-robin order. `python -m eval.bench_decode` measures
what it buys (docs/BENCHMARKS.md). A batch that fails leaves every KV as it was and
its jobs step one by one.

Admission control: at most `max_sessions` jobs at once (`EngineFullError` beyond). A job
ends when its client closes it (`close`) or, for a one-shot answer, when the answer is done;
the model thread then releases its KV, encoder state and queued frames. Backpressure: a job
whose `can_emit()` is False (its client's queue is full) gets no decode steps until it drains;
frames still go in.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol

from kernels import AttentionSpec
from kernels.errors import VidsieveError
from streaming.session import DrainingError, ErrorEvent, Event, SessionError
from vlm.model import VideoAnswering

log = logging.getLogger("vidsieve.engine")


class EngineFullError(SessionError):
    """Every session slot is taken; try again later."""

    code = "server_full"


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 16  # live sessions plus one-shot answers in flight
    idle_wait_s: float = 0.05  # how long the model thread sleeps when no job can run
    max_decode_batch: int = 16  # decode steps of this many jobs run as one batch; 1: never batch


@dataclass(frozen=True)
class EngineStats:
    sessions: int  # jobs held (live sessions and one-shot answers)
    queue_depth: int  # work items waiting across all jobs
    kv_bytes: int  # keys and values held by live sessions
    decode_steps: int = 0  # decode steps the model has run, alone or in a batch
    decode_passes: int = 0  # forward passes those took (steps / passes: the mean batch size)


class Job(Protocol):
    """What the engine schedules: `Session` and `ClipAnswer`."""

    job_id: str
    attention: AttentionSpec
    closed: bool
    emit: Callable[[Event], None]

    def runnable(self) -> bool: ...
    def step(self) -> None: ...
    def finished(self) -> bool: ...
    def answering(self) -> bool: ...
    def pending(self) -> int: ...
    def kv_bytes(self) -> int: ...
    def stop_accepting(self) -> None: ...
    def release(self) -> None: ...


class Engine:
    def __init__(self, model: VideoAnswering, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self._jobs: list[Job] = []  # guarded by _wake; round-robin order
        self._cursor = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False
        self._default_attention = model.runner.attention_spec

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="vidsieve-model", daemon=True)
        self._thread.start()
        return self

    def begin_drain(self) -> None:
        """Refuse new jobs, new frames and new questions; what is queued still runs."""
        with self._wake:
            self.draining = True
            for job in self._jobs:
                job.stop_accepting()

    def busy(self) -> bool:
        """Whether any job still has a question to answer."""
        with self._wake:
            return any(job.answering() for job in self._jobs if not job.closed)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the model thread and release every job."""
        with self._wake:
            self._stopping = True
            for job in self._jobs:
                job.closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # --- jobs ------------------------------------------------------------------------------

    def admit(self, job: Job) -> Job:
        """Add a job built by the caller (a `Session` or a `ClipAnswer`), or raise when full."""
        with self._wake:
            if self.draining or self._stopping:
                raise DrainingError("the server is shutting down; no new sessions")
            if len(self._jobs) >= self.config.max_sessions:
                raise EngineFullError(f"all {self.config.max_sessions} sessions are in use; try again shortly")
            self._jobs.append(job)
            self._wake.notify_all()
        return job

    def close(self, job: Job) -> None:
        """End a job; the model thread releases its memory before its next work item."""
        with self._wake:
            job.closed = True
            self._wake.notify_all()

    def notify(self) -> None:
        """New work or room to emit: wake the model thread."""
        with self._wake:
            self._wake.notify_all()

    def stats(self) -> EngineStats:
        with self._wake:
            jobs = list(self._jobs)
        return EngineStats(len(jobs), sum(job.pending() for job in jobs), sum(job.kv_bytes() for job in jobs),
                           self.model.runner.decode_steps, self.model.runner.decode_passes)

    # --- the model thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                ended = [job for job in self._jobs if job.closed or job.finished()]
                self._jobs = [job for job in self._jobs if job not in ended]
                batch = [] if self._stopping else self._next_runnable()
                if not batch and not ended:
                    if self._stopping:
                        return
                    self._wake.wait(self.config.idle_wait_s)
                    continue
            for finished in ended:
                self._release(finished)
            if len(batch) > 1:
                self._decode_together(batch)
            for job in batch:
                self._step(job)

    def _next_runnable(self) -> list[Job]:
        """The next job after the last one served that has work it can do now; when that work
        is a decode step, with it the jobs after it (in round-robin order) that also wait on
        one, up to `max_decode_batch`. Empty when no job can run."""
        count = len(self._jobs)
        waiting = self.model.runner.waiting
        for offset in range(count):
            index = (self._cursor + offset) % count
            job = self._jobs[index]
            if not job.runnable():
                continue
            batch = [job]
            if job.job_id in waiting:
                for later in range(offset + 1, count):
                    if len(batch) == self.config.max_decode_batch:
                        break
                    other = self._jobs[(self._cursor + later) % count]
                    if other.job_id in waiting and not other.closed and other.runnable():
                        batch.append(other)
                        index = (self._cursor + later) % count
            self._cursor = index + 1
            return batch
        return []

    def _decode_together(self, batch: list[Job]) -> None:
        """Run the waiting decode steps of `batch` as one forward pass; each job's own step then
        takes the token it computed (or, if this failed, runs its step alone)."""
        steps = [self.model.runner.waiting[job.job_id] for job in batch]
        try:
            self.model.runner.step_batch(steps)
        except Exception:
            log.exception("batched decode step failed; its jobs step one by one",
                          extra={"session_id": ",".join(job.job_id for job in batch)})
            return

    def _step(self, job: Job) -> None:
        runner = self.model.runner
        runner.attention_spec, runner.owner = job.attention, job.job_id
        try:
            job.step()
        except VidsieveError as error:  # the user's input: tell the job's client, keep the job
            self._report(job, ErrorEvent(getattr(error, "code", "bad_request"), str(error)))
        except Exception:  # a bug: this job's state may be torn, so it ends; others go on
            log.exception("work item failed", extra={"session_id": job.job_id})
            self._report(job, ErrorEvent("internal", "internal error; the session was closed", fatal=True))
            self.close(job)
        finally:
            runner.attention_spec, runner.owner = self._default_attention, None

    def _report(self, job: Job, event: ErrorEvent) -> None:
        try:
            job.emit(event)
        except Exception:
            log.exception("could not report an error", extra={"session_id": job.job_id})

    def _release(self, job: Job) -> None:
        try:
            job.release()
        except Exception:
            log.exception("release failed", extra={"session_id": job.job_id})
