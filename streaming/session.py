"""Session: one live video that takes frames at any rate and answers questions at any time.

A client pushes RGB frames with their timestamps; the session keeps those that fall on its
target rate (the same rule as `SamplingPlan(fps=...)`), encodes each one as it arrives,
compresses it with a question-agnostic compressor and appends it to ONE `KVState` that lives
as long as the session. Questions are answered from that KV as it stands (ENAT-style reuse,
`VLM.stream_reused`): only the question's tokens are prefilled, and they are truncated away
again after the answer, so the video is never prefilled twice.

Memory policy (bounded however long the stream runs):
- VideoScan carriers (`compressors.videoscan.CarrierMemory`): after each frame's tokens comes
  its carrier, the mean of the frame's tokens, at the TRUE next position; the carrier attends
  to its frame and to everything kept before it. At most `carriers` of them are held; beyond
  that the earlier of the most similar adjacent pair goes.
- A window of the `window_frames` most recent frames keeps every token (and its carrier);
  older frames keep only their carrier, if the carrier memory still holds it.
So the KV holds at most `prefix + carriers + window_frames * (tokens_per_frame + 1)` slots
between questions. Positions are never renumbered: a frame's tokens and its carrier keep the
RoPE phase they were computed at, and the question continues after the last frame.

Two policies equal an offline run exactly (tested): `carriers=0, window_frames >= frames` is
`VLM.stream_reused(VLM.prefill_video(...))`, and `carriers=M, window_frames=0` is
`VLM.answer(..., "videoscan:memory=M")`.

Threading: `push_frame`, `ask` and `cancel` are called by a front door's thread and only
queue work; `step` runs on the engine's model thread, one work item (a frame, a question's
prefill, one decode step) at a time, and emits events through the `emit` callback.
`ClipAnswer`, a one-shot question about a whole clip (the HTTP front door), is scheduled the
same way.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from compressors import CompressionContext, CompressorSpec, VisualTokens, parse_spec
from compressors.videoscan import CarrierMemory
from kernels import AttentionSpec
from kernels.errors import VidsieveError
from vlm.encoder import PatchReuseEncoder
from vlm.kv import KVState
from vlm.lm_runner import SamplingParams
from vlm.model import VLM, PrefilledVideo, VideoAnswering
from vlm.reuse import ReuseSpec

_TIME_EPSILON_S = 1e-6  # as streaming.video: a frame exactly on a sampling target is taken


class SessionError(VidsieveError):
    """A request a session refuses; `code` names the reason on the wire."""

    code = "bad_request"


class SessionConfigError(SessionError):
    code = "bad_config"


class FrameTimestampError(SessionError):
    code = "bad_timestamp"


class BacklogFullError(SessionError):
    """More frames or questions waiting than the session queues; the client should slow down."""

    code = "backlog_full"


class DrainingError(SessionError):
    code = "shutting_down"


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPolicy:
    """What a session's KV keeps: VideoScan carriers with their true positions, plus every
    token of the most recent frames."""

    carriers: int = 64  # carriers held (0: none)
    window_frames: int = 4  # most recent frames that keep all their tokens

    def __post_init__(self) -> None:
        if self.carriers < 0 or self.window_frames < 0 or self.carriers + self.window_frames < 1:
            raise SessionConfigError(f"memory policy needs carriers >= 0, window_frames >= 0 and at least one "
                                     f"of them positive; got carriers={self.carriers}, "
                                     f"window_frames={self.window_frames}")


@dataclass(frozen=True)
class SessionConfig:
    """How one live session samples, compresses and remembers its video."""

    compressor: str = "none"  # per-frame, question-agnostic spec; `videoscan:memory=M` sets memory.carriers
    attention: str = "dense"
    fps: float | None = 2.0  # frames kept per second of video time; None keeps every frame
    memory: MemoryPolicy = MemoryPolicy()
    reuse: str = "none"  # "patches[:threshold=T,refresh=N]": re-encode only changed patches
    max_pending_frames: int = 64
    max_pending_questions: int = 4

    def __post_init__(self) -> None:
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise SessionConfigError(f"fps must be a positive number or null, got {self.fps!r}")


# --- events a session emits -------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerUsage:
    visual_tokens_kept: int  # visual slots in the KV the answer read
    visual_tokens_seen: int  # visual tokens encoded so far, before compression and eviction
    frames_seen: int  # frames encoded so far
    prompt_tokens: int  # tokens prefilled for this answer (a session reuses its video KV: the question's only)
    completion_tokens: int
    time_to_first_token_s: float | None  # from the question's arrival to its first token
    kv_bytes: int  # keys and values held while answering


@dataclass(frozen=True)
class AnswerDelta:
    question_id: str
    text: str  # new text since the previous delta


@dataclass(frozen=True)
class AnswerDone:
    question_id: str
    text: str  # the whole answer
    finish_reason: str  # "stop", "length" or "cancelled"
    usage: AnswerUsage


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str
    question_id: str | None = None
    fatal: bool = False  # the session is gone


Event = AnswerDelta | AnswerDone | ErrorEvent
Emit = Callable[[Event], None]


@dataclass(frozen=True)
class Question:
    question_id: str
    text: str
    sampling: SamplingParams
    asked_at: float = dataclasses.field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class _PendingFrame:
    rgb: np.ndarray  # uint8 [H, W, 3]
    timestamp_s: float


# --- pieces shared by both kinds of work ------------------------------------------------------


class FrameSampler:
    """Keeps the frames that fall on a target rate, by timestamp: targets are t0 + k / fps
    from the first frame's time t0, and each target takes the first frame at or after it
    (as `SamplingPlan(fps=...)` does for files). Timestamps must increase."""

    def __init__(self, fps: float | None):
        self.fps = fps
        self._first_s: float | None = None
        self._last_s: float | None = None
        self._next_target = 0  # k of the next target

    def wants(self, timestamp_s: float) -> bool:
        """Whether a frame at `timestamp_s` would be kept; raises for a bad timestamp."""
        if not math.isfinite(timestamp_s) or timestamp_s < 0:
            raise FrameTimestampError(f"frame timestamp must be a finite number >= 0, got {timestamp_s!r}")
        if self._last_s is not None and timestamp_s <= self._last_s:
            raise FrameTimestampError(f"frame timestamps must increase: {timestamp_s} after {self._last_s}")
        if self.fps is None or self._first_s is None:
            return True
        return timestamp_s >= self._first_s + self._next_target / self.fps - _TIME_EPSILON_S

    def advance(self, timestamp_s: float) -> bool:
        """Record a frame; returns whether it is kept."""
        kept = self.wants(timestamp_s)
        self._last_s = timestamp_s
        if self.fps is not None and kept:
            if self._first_s is None:
                self._first_s = timestamp_s
            # skip every target at or before this frame, as streaming.video._pick_at_rate does
            self._next_target = max(self._next_target + 1,
                                    math.floor((timestamp_s + _TIME_EPSILON_S - self._first_s) * self.fps) + 1)
        return kept


@dataclass(frozen=True)
class MemorySnapshot:
    visual_tokens_kept: int
    visual_tokens_seen: int
    frames_seen: int
    prompt_tokens: int
    kv_bytes: int


class AnswerStream:
    """Turns a token-id iterator into `AnswerDelta`s and one `AnswerDone`, one token a step."""

    def __init__(self, question: Question, tokens: Iterator[int], model: VideoAnswering, emit: Emit,
                 snapshot: Callable[[], MemorySnapshot]):
        self.question = question
        self._tokens = tokens
        self._tokenizer = model.tokenizer
        self.emit = emit
        self._snapshot = snapshot
        self._memory: MemorySnapshot | None = None
        self.ids: list[int] = []
        self.text = ""
        self.first_token_s: float | None = None

    def step(self) -> bool:
        """Produce one token (the first one includes the prefill). Returns True when done."""
        sampling = self.question.sampling
        try:
            token = next(self._tokens)
        except StopIteration:
            return self._finish("stop" if self.ids and self.ids[-1] in sampling.stop_token_ids else "length")
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.question.asked_at
            self._memory = self._snapshot()
        self.ids.append(token)
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if text.startswith(self.text) and len(text) > len(self.text):
            self.emit(AnswerDelta(self.question.question_id, text[len(self.text):]))
            self.text = text
        if token in sampling.stop_token_ids:
            return self._finish("stop")
        if len(self.ids) >= sampling.max_new_tokens:
            return self._finish("length")
        return False

    def cancel(self) -> None:
        self._finish("cancelled")

    def close(self) -> None:
        """Stop without an event (the session is going away); restores the video KV."""
        self._tokens.close()

    def _finish(self, reason: str) -> bool:
        self._tokens.close()  # a reused video's KV is truncated back to the video here
        memory = self._memory or self._snapshot()
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        usage = AnswerUsage(memory.visual_tokens_kept, memory.visual_tokens_seen, memory.frames_seen,
                            memory.prompt_tokens, len(self.ids), self.first_token_s, memory.kv_bytes)
        self.emit(AnswerDone(self.question.question_id, text, reason, usage))
        return True


def check_question_agnostic(spec: CompressorSpec) -> None:
    """A session compresses each frame before any question exists: the compressor must not
    read the question or act inside the LM (VideoScan is the session's memory, not a compressor)."""
    if spec.compressor.uses_question or spec.compressor.stage != "pre_llm" or hasattr(spec.compressor, "hook"):
        raise SessionConfigError(
            f"compressor {spec.name!r} reads the question or acts inside the LM, so it cannot compress a live "
            f"stream before the question is asked; use a question-agnostic pre-LLM compressor (none, avgpool, "
            f"uniform, random, todre, divprune) or videoscan:memory=N as the memory policy")


# --- the live session -------------------------------------------------------------------------


class Session:
    """One live video: frames in, a bounded KV, answers out. See the module docstring."""

    def __init__(self, model: VLM, config: SessionConfig, emit: Emit, *, session_id: str,
                 can_emit: Callable[[], bool] = lambda: True):
        if not isinstance(model, VLM):
            raise SessionConfigError(f"live sessions run vidsieve-native models (frame-by-frame encoding and "
                                     f"carriers); {model.display_name} answers whole clips only")
        spec = parse_spec(config.compressor)
        memory = config.memory
        if hasattr(spec.compressor, "new_memory"):  # videoscan:memory=M is the carrier memory
            memory = dataclasses.replace(memory, carriers=spec.compressor.new_memory().limit)
            spec = parse_spec("none")
        check_question_agnostic(spec)
        if not model.config.chat_template.split("{video}")[1].lstrip().startswith("{question}"):
            raise SessionConfigError("a live session needs a chat template where the question follows the video")
        self.model = model
        self.config = dataclasses.replace(config, memory=memory)
        self.session_id = session_id
        self.spec = spec
        self.attention = AttentionSpec.parse(config.attention)
        reuse = ReuseSpec.parse(config.reuse)
        self._encoder = (PatchReuseEncoder(model.encoder, threshold=reuse.threshold, refresh_every=reuse.refresh_every)
                         if reuse.patches else model.encoder)
        self._carriers = CarrierMemory(memory.carriers) if memory.carriers else None
        self._previous_rgb: np.ndarray | None = None  # the last frame encoded
        self.emit = emit
        self._can_emit = can_emit
        self._sampler = FrameSampler(config.fps)
        self._lock = threading.Lock()
        self._inbox: deque[_PendingFrame | Question] = deque()  # guarded by _lock
        self._pending_frames = self._pending_questions = 0  # guarded by _lock
        self._cancel_all = False  # guarded by _lock
        self._cancel_ids: set[str] = set()  # guarded by _lock
        self._accepting = True
        self.closed = False
        # model-thread state
        self.state: KVState | None = None
        self._answer: AnswerStream | None = None
        self._next_position = 0  # true position of the next frame's first token (or the question's)
        self.frames_received = 0  # pushed by the client, before sampling
        self.frames_seen = 0  # encoded
        self.visual_tokens_seen = 0

    # --- front-door side (any thread) --------------------------------------------------------

    def push_frame(self, timestamp_s: float, decode: Callable[[], np.ndarray]) -> bool:
        """Queue the frame at `timestamp_s`. `decode()` gives its pixels, uint8 [H, W, 3], and is
        called only when the sampler keeps the frame (outside the lock: pushes of one session
        come one at a time). Returns False when the sampler drops the frame."""
        with self._lock:
            if self.closed:
                raise SessionError("the session has ended")
            if not self._accepting:
                raise DrainingError("the server is shutting down; no new frames")
            wanted = self._sampler.wants(timestamp_s)
            if wanted and self._pending_frames >= self.config.max_pending_frames:
                raise BacklogFullError(f"{self._pending_frames} frames are waiting to be encoded; "
                                       f"frame at {timestamp_s:.3f} s dropped, slow down")
        rgb = decode() if wanted else None
        if rgb is not None and (rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3):
            raise SessionError(f"a frame must be uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
        with self._lock:
            self.frames_received += 1
            self._sampler.advance(timestamp_s)
            if rgb is not None:
                self._inbox.append(_PendingFrame(rgb, float(timestamp_s)))
                self._pending_frames += 1
        return rgb is not None

    def ask(self, question: Question) -> None:
        """Queue a question; it is answered from the frames pushed before it."""
        with self._lock:
            if self.closed:
                raise SessionError("the session has ended")
            if not self._accepting:
                raise DrainingError("the server is shutting down; no new questions")
            if self._pending_questions >= self.config.max_pending_questions:
                raise BacklogFullError(f"{self._pending_questions} questions are already waiting")
            self._inbox.append(question)
            self._pending_questions += 1

    def cancel(self, question_id: str | None = None) -> bool:
        """Cancel one question (queued or being answered), or all of them. Returns whether
        there was anything to cancel; the cancelled answers end with finish_reason "cancelled"."""
        with self._lock:
            active = self._answer.question.question_id if self._answer else None
            queued = [item.question_id for item in self._inbox if isinstance(item, Question)]
            if question_id is None:
                found = active is not None or bool(queued)
                self._cancel_all = self._cancel_all or found
            else:
                found = question_id == active or question_id in queued
                if found:
                    self._cancel_ids.add(question_id)
        return found

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    # --- engine side (the model thread) ------------------------------------------------------

    @property
    def job_id(self) -> str:
        return self.session_id

    def pending(self) -> int:
        """Work items waiting: frames, questions, and the answer being decoded."""
        with self._lock:
            return len(self._inbox) + (self._answer is not None)

    def answering(self) -> bool:
        with self._lock:
            return self._answer is not None or self._pending_questions > 0

    def finished(self) -> bool:
        return False  # a live session lasts until its client ends it

    def runnable(self) -> bool:
        with self._lock:
            if self._cancel_all or self._cancel_ids:
                return True
            if self._answer is not None:
                return self._can_emit()
            return bool(self._inbox) and (isinstance(self._inbox[0], _PendingFrame) or self._can_emit())

    def kv_bytes(self) -> int:
        state = self.state  # read once: the model thread may release it meanwhile
        return state.nbytes() if state is not None else 0

    @torch.inference_mode()
    def step(self) -> None:
        """One work item: pending cancellations, else one decode step of the current answer,
        else the next frame or question in arrival order."""
        if self.state is None:
            self._start()
        if self._apply_cancellations():
            return
        if self._answer is not None:
            self._answer_step(self._answer.question, self._answer.step)
            return
        with self._lock:
            if not self._inbox:
                return
            item = self._inbox.popleft()
            if isinstance(item, Question):
                self._pending_questions -= 1
            else:
                self._pending_frames -= 1
        if isinstance(item, Question):
            self._answer_step(item, lambda: self._begin_answer(item))
        else:
            self._ingest(item)

    def release(self) -> None:
        """Free everything the session holds (model thread)."""
        if self._answer is not None:
            self._answer.close()
        with self._lock:
            self._inbox.clear()
            self._answer = None
        self.state = None
        self._carriers = None
        self._encoder = None

    def _start(self) -> None:
        """Prefill the chat template's text before the video."""
        model = self.model
        prefix = model.tokenizer(model.config.chat_template.split("{video}")[0].strip(), add_special_tokens=False,
                                 return_tensors="pt").input_ids[0]
        grid_h, grid_w = model.encoder.grid
        per_frame = (grid_h // model.config.spatial_merge) * (grid_w // model.config.spatial_merge)
        memory = self.config.memory
        capacity = len(prefix) + memory.carriers + (memory.window_frames + 1) * (per_frame + 1) + 128
        self.state = model.runner.new_state(capacity=capacity)
        model.runner.forward(model.runner.embed(prefix), torch.arange(len(prefix)), self.state)
        self._next_position = len(prefix)
        self._video_start = len(prefix)
        self._frame_positions = 0  # positions each frame takes (its tokens' span, and its carrier)

    def _apply_cancellations(self) -> bool:
        with self._lock:
            cancel_all, cancel_ids = self._cancel_all, self._cancel_ids
            self._cancel_all, self._cancel_ids = False, set()
            dropped = [item for item in self._inbox
                       if isinstance(item, Question) and (cancel_all or item.question_id in cancel_ids)]
            for question in dropped:
                self._inbox.remove(question)
                self._pending_questions -= 1
            answer = self._answer
            cancel_answer = answer is not None and (cancel_all or answer.question.question_id in cancel_ids)
            if cancel_answer:
                self._answer = None
        if cancel_answer:
            answer.cancel()
        if dropped:
            memory = self._memory_snapshot()
            for question in dropped:
                usage = AnswerUsage(memory.visual_tokens_kept, memory.visual_tokens_seen, memory.frames_seen,
                                    0, 0, None, memory.kv_bytes)
                self.emit(AnswerDone(question.question_id, "", "cancelled", usage))
        return cancel_answer or bool(dropped)

    def _encode(self, frame: _PendingFrame) -> VisualTokens:
        """One frame -> its visual tokens; the projector's time embedding and the tokens'
        frame index are the frame's number in the stream (as for frame t of a clip)."""
        number = self.frames_seen
        features = self._encoder.encode(frame.rgb[None], previous=self._previous_rgb).tokens  # [1, Hg, Wg, D]
        self._previous_rgb = frame.rgb  # a motion-input tower reads each frame's change from this one
        embeds = self.model.projector(features, frame_index=torch.tensor([number]))  # [1, Hg/m, Wg/m, D_lm]
        tokens = VisualTokens.from_grid(embeds, [frame.timestamp_s])
        return dataclasses.replace(tokens, frame_index=torch.full_like(tokens.frame_index, number))

    def _ingest(self, frame: _PendingFrame) -> None:
        """Encode, compress and prefill one frame (and its carrier), then evict what the
        memory policy no longer keeps."""
        runner, state = self.model.runner, self.state
        tokens = self._encode(frame)
        number = self.frames_seen
        self.frames_seen += 1
        self.visual_tokens_seen += len(tokens)
        if self.spec.name != "none":
            ctx = CompressionContext(question="", budget=self.spec.budget, seed=number, model=self.model)
            tokens_kept = self.spec.compressor.compress(tokens, ctx)
        else:
            tokens_kept = tokens
        start = self._next_position
        if len(tokens_kept):
            if self._carriers is not None:
                chunk = self._carriers.frame_chunk(tokens_kept, start + int(tokens_kept.positions[:, 0].min()))
                embeds, positions, frame_index = chunk.embeds, chunk.positions, chunk.frame_index
            else:
                embeds = tokens_kept.embeds
                positions, frame_index = start + tokens_kept.positions[:, 0].cpu(), tokens_kept.frame_index.cpu()
            runner.forward(embeds.to(runner.dtype), positions, state,
                           is_visual=torch.ones(len(embeds), dtype=torch.bool), frame_index=frame_index)
            if self._carriers is not None:
                self._carriers.admit(chunk)
            keep = self._keep_mask(number)
            if not bool(keep.all()):
                state.evict(keep)
        # the frame's full span (and its carrier) stays reserved, pruned or not
        self._frame_positions = tokens.span_length + (self._carriers is not None)
        self._next_position = start + self._frame_positions
        state.next_position = self._next_position

    def _keep_mask(self, newest_frame: int) -> torch.Tensor:
        """[S] slots to keep: text, carriers the memory holds, and the recent window's frames."""
        state = self.state
        keep = (self._carriers.keep_mask(state.positions, state.is_visual) if self._carriers is not None
                else ~state.is_visual)
        window = self.config.memory.window_frames
        if window:
            keep |= state.is_visual & (state.frame_index > newest_frame - window)
        return keep

    def _answer_step(self, question: Question, work: Callable[[], bool]) -> None:
        """Run one step of a question's answer; it ends when done or when the step fails (the
        client hears which question failed, and the video KV is restored)."""
        try:
            done = work()
        except VidsieveError as error:
            self.emit(ErrorEvent(getattr(error, "code", "bad_request"), str(error), question.question_id))
            done = True
            if self._answer is not None:
                self._answer.close()
        if done:
            with self._lock:
                self._answer = None

    def _begin_answer(self, question: Question) -> bool:
        video = PrefilledVideo(self.state, self.state.length, self._question_position(), self.visual_tokens_seen,
                               int(self.state.is_visual.sum()))
        tokens = self.model.stream_reused(video, question.text, question.sampling)
        with self._lock:
            self._answer = AnswerStream(question, tokens, self.model, self.emit,
                                        lambda: self._memory_snapshot(video.video_slots))
        return self._answer.step()

    def _question_position(self) -> int:
        """Where a question asked now starts: after the frames so far, and no earlier than after
        the model's trained clip length (`VLM.text_position`), so a question a few frames into a
        stream sits where the model learnt to find it."""
        return self.model.text_position(self._video_start, self._next_position, self._frame_positions)

    def _memory_snapshot(self, video_slots: int | None = None) -> MemorySnapshot:
        state = self.state
        visual = int(state.is_visual.sum()) if state is not None else 0
        prompt = state.length - video_slots if state is not None and video_slots is not None else 0
        return MemorySnapshot(visual, self.visual_tokens_seen, self.frames_seen, prompt, self.kv_bytes())


# --- a one-shot question about a whole clip ---------------------------------------------------


class ClipAnswer:
    """One question about a whole clip, as the HTTP front door asks it: encode every frame,
    then `stream_tokens` with any compressor (question-aware and in-LLM ones included), on
    any model (vidsieve-native or a Hugging Face adapter). The answer is exactly `answer`'s."""

    def __init__(self, model: VideoAnswering, frames: np.ndarray, timestamps_s: np.ndarray, question: Question,
                 spec: CompressorSpec, emit: Emit, *, job_id: str, attention: str = "dense",
                 can_emit: Callable[[], bool] = lambda: True):
        self.model = model
        self.job_id = job_id
        self.attention = AttentionSpec.parse(attention)
        self.spec = spec
        self.question = question
        self._frames, self._timestamps_s = frames, timestamps_s  # uint8 [T, H, W, 3], [T]
        self.emit = emit
        self._can_emit = can_emit
        self._answer: AnswerStream | None = None
        self._timings: dict = {}
        self._done = False
        self.closed = False

    def pending(self) -> int:
        return 0 if self._done else 1

    def answering(self) -> bool:
        return not self._done

    def finished(self) -> bool:
        return self._done

    def runnable(self) -> bool:
        return not self._done and (self._answer is None or self._can_emit())

    def kv_bytes(self) -> int:
        return 0  # the one-shot KV lives inside VLM.stream_tokens for one answer

    def stop_accepting(self) -> None:
        pass  # nothing new arrives after construction

    @torch.inference_mode()
    def step(self) -> None:
        try:
            self._step()
        except Exception:
            self._done = True  # one question, one try: the engine reports the error
            raise

    def _step(self) -> None:
        if self._answer is None:
            tokens = self.model.encode_frames(self._frames, self._timestamps_s)
            self._frames = None  # the pixels are not needed again
            iterator = self.model.stream_tokens(tokens, self.question.text, self.spec, self.question.sampling,
                                                self._timings)
            self._answer = AnswerStream(self.question, iterator, self.model, self.emit, self._snapshot)
            self._visual_seen, self._frames_seen = len(tokens), tokens.num_frames
            return
        self._done = self._answer.step()

    def release(self) -> None:
        if self._answer is not None and not self._done:
            self._answer.close()
        self._answer = None
        self._frames = None
        self._done = True

    def _snapshot(self) -> MemorySnapshot:
        """prompt_tokens: the visual tokens kept plus the question's own tokens (the chat
        template's few are not counted: the prompt is laid out inside `stream_tokens`)."""
        kept = self._timings.get("visual_after", 0)
        question_tokens = len(self.model.tokenizer(self.question.text, add_special_tokens=False).input_ids)
        return MemorySnapshot(kept, self._visual_seen, self._frames_seen, kept + question_tokens, 0)
