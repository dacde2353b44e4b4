"""Video files in, RGB frames out: metadata, every frame's presentation time, sampling plans.

    open_video("clip.mp4", num_frames=8)   # -> Video: .meta, .timestamps_s, .selected_indices
        1. probe with PyAV: demux every packet (no decoding) for exact presentation times,
           check the container's index against what could be read, decode one frame for the
           display rotation
        2. plan_frame_indices(timestamps_s, plan): a pure function, the same for every backend
        3. iterate: decode in order, convert ONLY the selected frames to RGB, rotate for display

Timestamps always come from presentation times, never from `index / fps`, so variable-frame-
rate video is sampled by time. The one exception is an elementary stream (raw `.h264`) whose
frames carry no clock at all; there frame k is at `k / native_fps`.

Two backends decode: PyAV (always installed) and decord (an optional extra). decord's index is
cross-checked against PyAV's at open time and both report the same exact timestamps, so a plan
selects the same frames whichever backend decodes them.

Every failure a user can cause raises a VidsieveError: `VideoDecodeError` (naming the file and
the reason) or `SamplingPlanError`; no raw `av` or `OSError` escapes.
"""

from __future__ import annotations

import bisect
import math
import numbers
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from kernels.errors import VidsieveError

BACKENDS = ("auto", "pyav", "decord")
SEEK_AHEAD_S = 2.0  # seek instead of decoding forward when the next wanted frame is this far ahead
DECORD_BATCH_FRAMES = 8  # frames per decord.get_batch call: bounds memory, lets the deadline bite
DECORD_TIMESTAMP_TOLERANCE_S = 1e-3  # decord reports float32 start times
_TIME_EPSILON_S = 1e-6  # absorbs float rounding when a sampling target lands exactly on a frame
# FFmpeg renders text files (.txt, .nfo, .asc, ...) as "video" through these text-art codecs.
_TEXT_ART_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


class VideoDecodeError(VidsieveError):
    """A video could not be opened or decoded; the message names the file and the reason."""


class SamplingPlanError(VidsieveError):
    """A sampling plan is contradictory, out of range, or selects nothing."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields element-wise is ambiguous
class Frame:
    """One decoded frame, turned upright for display.

    rgb: uint8 [H, W, 3].
    timestamp_s: presentation time in seconds; the stream's first frame is at ~0.
    index: position of the frame in the source, presentation order, 0-based.
    """

    rgb: np.ndarray
    timestamp_s: float
    index: int


@dataclass(frozen=True)
class VideoMeta:
    """What the container says about its first video stream.

    width, height: display size, i.e. AFTER rotation.
    rotation_deg: 0, 90, 180 or 270; the counter-clockwise turn applied to each stored picture
        to display it (from the stream's display matrix; mirror flips are ignored). A phone's
        legacy `rotate=90` tag (clockwise) reads as 270 here.
    duration_s, native_fps, frame_count: None where the container does not say.
    """

    path: str
    duration_s: float | None
    native_fps: float | None
    frame_count: int | None
    width: int
    height: int
    codec: str
    rotation_deg: int


@dataclass(frozen=True)
class SamplingPlan:
    """Which frames of [start_s, end_s) to decode. All times are presentation times in seconds.

    fps: sample at this rate. Targets are start + k / fps for k = 0, 1, ...; each target takes
        the FIRST frame whose timestamp is >= the target; a frame taken twice is kept once. So
        fps above the native rate returns every frame, never a duplicate.
    num_frames: sample uniformly in TIME: split the clip into this many equal segments and take
        the frame nearest each segment's centre (ties go to the earlier frame; duplicates are
        dropped, so short clips may return fewer). Without end_s the clip ends at its last
        frame's timestamp (a frame's own duration is not known from timestamps alone).
    Neither fps nor num_frames: every frame in [start_s, end_s).
    max_frames: a cap applied last; if more frames were selected, keep max_frames of them
        spread uniformly (the one at the centre of each of max_frames equal runs).
    start_s, end_s: the window; None means the first frame / past the last frame.
    """

    fps: float | None = None
    num_frames: int | None = None
    max_frames: int | None = None
    start_s: float | None = None
    end_s: float | None = None

    def __post_init__(self) -> None:
        if self.fps is not None and self.num_frames is not None:
            raise SamplingPlanError("choose fps or num_frames, not both")
        if self.fps is not None and not (_is_real(self.fps) and math.isfinite(self.fps) and self.fps > 0):
            raise SamplingPlanError(f"fps must be a positive number, got {self.fps!r}")
        for name in ("num_frames", "max_frames"):
            count = getattr(self, name)
            if count is not None and not (_is_int(count) and count >= 1):
                raise SamplingPlanError(f"{name} must be a positive integer, got {count!r}")
        for name in ("start_s", "end_s"):
            seconds = getattr(self, name)
            if seconds is not None and not (_is_real(seconds) and math.isfinite(seconds) and seconds >= 0):
                raise SamplingPlanError(f"{name} must be a non-negative number of seconds, got {seconds!r}")
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise SamplingPlanError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# Sampling: a pure function of the timestamps, shared by every backend
# ----------------------------------------------------------------------------------------------


def plan_frame_indices(timestamps_s: Sequence[float], plan: SamplingPlan) -> list[int]:
    """Indices of the frames `plan` selects, ascending.

    timestamps_s: the presentation time of every frame, in presentation order (ascending).
    Returns [] when no frame falls in the plan's window.
    """
    first = 0 if plan.start_s is None else bisect.bisect_left(timestamps_s, plan.start_s - _TIME_EPSILON_S)
    stop = len(timestamps_s) if plan.end_s is None else bisect.bisect_left(timestamps_s, plan.end_s - _TIME_EPSILON_S)
    if first >= stop:
        return []
    clip_start_s = timestamps_s[first] if plan.start_s is None else plan.start_s

    if plan.fps is not None:
        chosen = _pick_at_rate(timestamps_s, first, stop, clip_start_s, plan.fps)
    elif plan.num_frames is not None:
        clip_end_s = timestamps_s[stop - 1] if plan.end_s is None else plan.end_s
        chosen = _pick_uniform_in_time(timestamps_s, first, stop, clip_start_s, clip_end_s, plan.num_frames)
    else:
        chosen = list(range(first, stop))

    if plan.max_frames is not None and len(chosen) > plan.max_frames:
        chosen = _subsample_uniformly(chosen, plan.max_frames)
    return chosen


def _pick_at_rate(timestamps_s: Sequence[float], first: int, stop: int, clip_start_s: float, fps: float) -> list[int]:
    """For targets clip_start + k / fps, the first frame in [first, stop) at or after each."""
    chosen: list[int] = []
    k = 0
    while True:
        target_s = clip_start_s + k / fps
        index = bisect.bisect_left(timestamps_s, target_s - _TIME_EPSILON_S, first, stop)
        if index == stop:
            return chosen
        if not chosen or index != chosen[-1]:
            chosen.append(index)
        # Targets at or before this frame's time would pick it again: jump past them, so a
        # huge fps on a long clip costs one step per frame, not one per target.
        k = max(k + 1, math.floor((timestamps_s[index] + _TIME_EPSILON_S - clip_start_s) * fps) + 1)


def _pick_uniform_in_time(
    timestamps_s: Sequence[float], first: int, stop: int, clip_start_s: float, clip_end_s: float, num_frames: int
) -> list[int]:
    """For num_frames equal segments of [clip_start, clip_end), the frame nearest each centre."""
    segment_s = (clip_end_s - clip_start_s) / num_frames
    chosen: list[int] = []
    for segment in range(num_frames):
        centre_s = clip_start_s + (segment + 0.5) * segment_s
        after = bisect.bisect_left(timestamps_s, centre_s, first, stop)
        candidates = [i for i in (after - 1, after) if first <= i < stop]
        nearest = min(candidates, key=lambda i: (abs(timestamps_s[i] - centre_s), i))
        if not chosen or nearest != chosen[-1]:
            chosen.append(nearest)
    return chosen


def _subsample_uniformly(indices: list[int], count: int) -> list[int]:
    """`count` of `indices`: the one at the centre of each of `count` equal runs."""
    return [indices[math.floor((j + 0.5) * len(indices) / count)] for j in range(count)]


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------


def open_video(
    source: str | os.PathLike,
    plan: SamplingPlan | None = None,
    *,
    backend: str = "auto",
    timeout_s: float = 120.0,
    **plan_kwargs: Any,
) -> Video:
    """Open a video file or URL, index its frames and choose the ones `plan` asks for.

    plan_kwargs (fps=, num_frames=, max_frames=, start_s=, end_s=) build a SamplingPlan when
    `plan` is not given. backend: "pyav", "decord", or "auto" (decord when importable and it
    can read this file, else PyAV). timeout_s bounds the wall-clock time spent decoding (per
    pass: opening, and each iteration) and is the network timeout for URLs.

    Raises VideoDecodeError for unreadable input, SamplingPlanError for a bad plan or one that
    selects no frame.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if plan is not None and plan_kwargs:
        raise SamplingPlanError("pass a SamplingPlan or plan keywords, not both")
    plan = plan if plan is not None else SamplingPlan(**plan_kwargs)
    path = os.fspath(source)
    if not isinstance(path, str):
        raise TypeError(f"source must be a str or os.PathLike of str, got {type(source).__name__}")

    index = _probe_with_pyav(path, _DecodeBudget(path, timeout_s))
    selected = plan_frame_indices(index.timestamps_s, plan)
    if not selected:
        span = f"{index.timestamps_s[0]:.3f}-{index.timestamps_s[-1]:.3f} s"
        raise SamplingPlanError(f"the plan selects no frame of {path!r} (its frames span {span}): {plan}")

    decoder: _PyAVDecoder | _DecordDecoder = _PyAVDecoder(path, index, timeout_s)
    if backend == "decord":
        decoder = _DecordDecoder(path, index, timeout_s, fallback=None)
    elif backend == "auto" and _decord_is_importable():
        try:
            decoder = _DecordDecoder(path, index, timeout_s, fallback=decoder)
        except VideoDecodeError:
            pass  # decord cannot read this file the way PyAV does (see _DecordDecoder); PyAV can.
    return Video(index.meta, index.timestamps_s, tuple(selected), decoder)


class Video:
    """An opened video: metadata, every frame's timestamp, and the frames a plan selected.

    Iterating decodes the selected frames in order and yields `Frame`s; each iteration decodes
    afresh, so a Video can be read more than once.
    """

    def __init__(
        self,
        meta: VideoMeta,
        timestamps_s: tuple[float, ...],
        selected_indices: tuple[int, ...],
        decoder: _PyAVDecoder | _DecordDecoder,
    ) -> None:
        self.meta = meta
        self.timestamps_s = timestamps_s  # every frame, presentation order
        self.selected_indices = selected_indices  # ascending
        self.backend = decoder.name  # "pyav" or "decord": which one decodes
        self._decoder = decoder

    def __iter__(self) -> Iterator[Frame]:
        return self._decoder.frames(self.selected_indices)

    def __len__(self) -> int:
        return len(self.selected_indices)

    def read_all(self) -> list[Frame]:
        """Every selected frame, decoded. Mind the memory: H * W * 3 bytes each."""
        return list(self)

    def __repr__(self) -> str:
        return f"Video({self.meta.path!r}, {len(self)} of {len(self.timestamps_s)} frames, backend={self.backend!r})"


# ----------------------------------------------------------------------------------------------
# Errors and the decoding deadline
# ----------------------------------------------------------------------------------------------


def _decode_error(path: str, reason: str) -> VideoDecodeError:
    return VideoDecodeError(f"cannot decode {path!r}: {reason}")


def _is_url(path: str) -> bool:
    return "://" in path


def _check_local_file(path: str) -> None:
    """Name the common local mistakes before FFmpeg turns them into 'Invalid data'."""
    if _is_url(path):
        return
    if not os.path.exists(path):
        raise _decode_error(path, "file not found")
    if os.path.isdir(path):
        raise _decode_error(path, "path is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise _decode_error(path, "file is empty")


def _describe_invalid_data(path: str) -> str:
    """Why FFmpeg found no container it could read in `path`."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
    except OSError:
        head = b""
    if head[4:8] == b"ftyp":
        # An MP4/MOV whose index (the 'moov' atom) never made it into the file: typically
        # cut short while its index was still due at the end.
        return "truncated or corrupt MP4/MOV: its index (the 'moov' atom) is missing"
    return "not a video file (FFmpeg found no container format it can read)"


@contextmanager
def _pyav_errors_as_decode_errors(path: str) -> Iterator[None]:
    """Re-raise PyAV and OS errors as VideoDecodeError naming the file and the reason."""
    try:
        yield
    except av.error.InvalidDataError as error:
        raise _decode_error(path, _describe_invalid_data(path)) from error
    except av.error.ExitError as error:  # av.open's timeout fired
        raise _decode_error(path, "I/O timed out (no data arrived within the timeout)") from error
    except (av.FFmpegError, OSError, UnicodeDecodeError, EOFError) as error:
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise _decode_error(path, reason) from error


class _DecodeBudget:
    """Wall-clock seconds spent decoding, excluding time a consumer holds a yielded frame."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path, self.timeout_s = path, timeout_s
        self._spent_s = 0.0
        self._running_since = time.monotonic()

    def check(self) -> None:
        if self._spent_s + time.monotonic() - self._running_since > self.timeout_s:
            raise _decode_error(self.path, f"decoding took longer than {self.timeout_s:g} s")

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._spent_s += time.monotonic() - self._running_since
        try:
            yield
        finally:
            self._running_since = time.monotonic()


def _upright(rgb: np.ndarray, rotation_deg: int) -> np.ndarray:
    """Turn a stored [H, W, 3] picture counter-clockwise by rotation_deg for display.

    Always returns a C-contiguous array: PyAV pads rows of odd widths, and np.rot90 returns
    negative strides, which torch.from_numpy refuses.
    """
    return np.ascontiguousarray(np.rot90(rgb, k=rotation_deg // 90))


# ----------------------------------------------------------------------------------------------
# PyAV: the probe (index + metadata) and the decoder
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamIndex:
    """What opening a video learns about its video stream."""

    meta: VideoMeta
    stream_index: int  # among all the container's streams
    timestamps_s: tuple[float, ...]  # every frame, presentation order
    # Every frame's pts in stream time_base, presentation order; None for elementary streams
    # whose frames carry no pts (decoded frames are then matched by decode order).
    frame_pts: tuple[int, ...] | None
    keyframe_pts: tuple[int, ...]  # ascending: where decoding can start after a seek


def _open_container(path: str, timeout_s: float) -> av.container.InputContainer:
    _check_local_file(path)
    with _pyav_errors_as_decode_errors(path):
        return av.open(path, timeout=timeout_s, metadata_errors="ignore")


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """The first video stream that is not cover art."""
    for stream in container.streams.video:
        if stream.codec_context.name in _TEXT_ART_CODECS:
            raise _decode_error(path, "not a video file (FFmpeg reads it as text)")
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise _decode_error(path, "no video stream (audio only?)")


def _probe_with_pyav(path: str, budget: _DecodeBudget) -> _StreamIndex:
    """Demux every packet of the video stream (cheap: no decoding) for its presentation times;
    decode just the first frame, for the display rotation and to prove the stream decodes."""
    with _open_container(path, budget.timeout_s) as container, _pyav_errors_as_decode_errors(path):
        stream = _video_stream(container, path)
        packet_pts: list[int] = []
        keyframe_pts: list[int] = []
        packets_without_pts = 0
        packets_read = 0  # everything the container delivered, even empty (dropped-frame) packets
        first_frame: av.VideoFrame | None = None
        for packet in container.demux(stream):
            budget.check()
            if packet.pts is None and packet.dts is None and packet.size == 0:
                if first_frame is None:
                    first_frame = _first_or_none(_decode_packet(packet))  # the end: flush the decoder
                continue
            packets_read += 1
            if packet.size == 0 or packet.is_discard:
                continue  # no frame will come out of it
            if packet.pts is None:
                packets_without_pts += 1
            else:
                packet_pts.append(packet.pts)
                if packet.is_keyframe:
                    keyframe_pts.append(packet.pts)
            if first_frame is None:
                first_frame = _first_or_none(_decode_packet(packet))

        if first_frame is None:
            raise _decode_error(path, "no decodable video frames (truncated or corrupt?)")
        if stream.frames and packets_read < stream.frames:
            raise _decode_error(
                path, f"truncated: the index lists {stream.frames} frames but only {packets_read} could be read"
            )

        frame_pts: list[int] | None = sorted(set(packet_pts))
        native_fps = _native_fps(stream)
        if packets_without_pts:
            decoded_pts = _decode_all_pts(path, budget)
            frame_pts = None if None in decoded_pts else sorted(set(decoded_pts))
        if frame_pts is not None:
            start_pts = stream.start_time if stream.start_time is not None else frame_pts[0]
            timestamps_s = tuple(float((pts - start_pts) * stream.time_base) for pts in frame_pts)
        elif native_fps is not None:
            timestamps_s = tuple(k / native_fps for k in range(len(decoded_pts)))
        else:
            raise _decode_error(path, "its frames carry no timestamps and it declares no frame rate")

        rotation_deg = round(first_frame.rotation / 90) * 90 % 360
        width, height = first_frame.width, first_frame.height
        if rotation_deg in (90, 270):
            width, height = height, width
        meta = VideoMeta(
            path=path,
            duration_s=_duration_s(container, stream),
            native_fps=native_fps,
            frame_count=len(timestamps_s),
            width=width,
            height=height,
            codec=stream.codec_context.codec.canonical_name,
            rotation_deg=rotation_deg,
        )
        return _StreamIndex(
            meta=meta,
            stream_index=stream.index,
            timestamps_s=timestamps_s,
            frame_pts=None if frame_pts is None else tuple(frame_pts),
            keyframe_pts=tuple(sorted(keyframe_pts)),
        )


def _decode_packet(packet: av.Packet) -> list[av.VideoFrame]:
    """The frames a packet completes; [] for a packet the decoder rejects as corrupt.

    Skipping a corrupt packet (as ffmpeg does) lets the rest of a damaged file play; a selected
    frame that never comes out is reported by the decoder loop.
    """
    try:
        return packet.decode()
    except av.FFmpegError:
        return []


def _first_or_none(frames: list[av.VideoFrame]) -> av.VideoFrame | None:
    return frames[0] if frames else None


def _decode_all_pts(path: str, budget: _DecodeBudget) -> list[int | None]:
    """Every decoded frame's pts, in decode output order: for containers whose packets lack
    pts. Raw elementary streams give None for every frame."""
    with _open_container(path, budget.timeout_s) as container, _pyav_errors_as_decode_errors(path):
        return [frame.pts for frame in _decoded_frames(container, _video_stream(container, path), budget)]


def _native_fps(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    return None


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _decoded_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    budget: _DecodeBudget,
    seek_pts: int | None = None,
) -> Iterator[av.VideoFrame]:
    """Decode forward from the start, or from the keyframe at or before seek_pts."""
    if seek_pts is not None:
        container.seek(seek_pts, stream=stream)  # flushes the decoder too
    for packet in container.demux(stream):
        budget.check()
        yield from _decode_packet(packet)


class _SeekMissed(Exception):
    """A seek did not land at or before the wanted frame (internal: decode from the start)."""


class _PyAVDecoder:
    """Decodes in order with PyAV, converting only the selected frames to RGB.

    When the next selected frame is more than SEEK_AHEAD_S ahead, a keyframe lies between,
    and the file carries a seek index (MP4/MOV, Matroska/WebM cues, AVI), it seeks to that
    keyframe and decodes forward, which is frame-exact. The seek targets the keyframe's pts,
    not the wanted frame's: MP4 indexes by decode time, and with B-frames a seek to the wanted
    frame's pts can land on a LATER keyframe whose decode time is earlier. Files without an
    index (MPEG-TS, raw streams) are decoded straight through: their seeks land only
    approximately. Should a seek still miss, the remaining frames are decoded from the start.
    """

    name = "pyav"

    def __init__(self, path: str, index: _StreamIndex, timeout_s: float) -> None:
        self.path, self.index, self.timeout_s = path, index, timeout_s

    def frames(self, selected: Sequence[int]) -> Iterator[Frame]:
        budget = _DecodeBudget(self.path, self.timeout_s)
        yielded = 0
        try:
            for frame in self._decode(selected, budget, may_seek=self.index.frame_pts is not None):
                yielded += 1
                yield frame
        except _SeekMissed:
            yield from self._decode(selected[yielded:], budget, may_seek=False)

    def _decode(self, selected: Sequence[int], budget: _DecodeBudget, may_seek: bool) -> Iterator[Frame]:
        frame_pts, timestamps_s = self.index.frame_pts, self.index.timestamps_s
        # Decoded frames are matched to indices by pts, or by decode order without pts.
        index_of_pts = None if frame_pts is None else {pts: i for i, pts in enumerate(frame_pts)}
        with _open_container(self.path, self.timeout_s) as container:
            with _pyav_errors_as_decode_errors(self.path):
                stream = container.streams[self.index.stream_index]
                stream.thread_type = "AUTO"
                may_seek = may_seek and len(stream.index_entries) > 0
                decoded = enumerate(_decoded_frames(container, stream, budget))
            last_index = -1  # index of the last frame the decoder produced
            for wanted in selected:
                seek_pts = self._keyframe_to_seek_to(wanted, last_index) if may_seek else None
                with _pyav_errors_as_decode_errors(self.path):
                    if seek_pts is not None:
                        decoded = enumerate(_decoded_frames(container, stream, budget, seek_pts))
                    frame, last_index = self._advance_to(decoded, wanted, index_of_pts)
                    if seek_pts is not None and last_index != wanted:
                        raise _SeekMissed()
                    if last_index != wanted:
                        at = f"frame {wanted} (at {timestamps_s[wanted]:.3f} s)"
                        raise _decode_error(self.path, f"truncated or corrupt: {at} could not be decoded")
                    rgb = _upright(frame.to_ndarray(format="rgb24"), self.index.meta.rotation_deg)  # [H, W, 3]
                with budget.paused():
                    yield Frame(rgb=rgb, timestamp_s=timestamps_s[wanted], index=wanted)

    def _keyframe_to_seek_to(self, wanted: int, last_index: int) -> int | None:
        """The pts of the last keyframe at or before frame `wanted`, if seeking there beats
        decoding forward from frame `last_index`; else None."""
        frame_pts, timestamps_s = self.index.frame_pts, self.index.timestamps_s
        if timestamps_s[wanted] - timestamps_s[max(last_index, 0)] <= SEEK_AHEAD_S:
            return None
        keyframes = self.index.keyframe_pts
        before = bisect.bisect_right(keyframes, frame_pts[wanted]) - 1
        if before < 0 or (last_index >= 0 and keyframes[before] <= frame_pts[last_index]):
            return None  # no keyframe between here and there: decoding forward is as quick
        return keyframes[before]

    @staticmethod
    def _advance_to(
        decoded: Iterator[tuple[int, av.VideoFrame]], wanted: int, index_of_pts: dict[int, int] | None
    ) -> tuple[av.VideoFrame | None, int]:
        """Decode until frame `wanted` or a later one; returns (that frame, its index)."""
        for ordinal, frame in decoded:
            index = ordinal if index_of_pts is None else index_of_pts.get(frame.pts)
            if index is not None and index >= wanted:
                return frame, index
        return None, -1


# ----------------------------------------------------------------------------------------------
# decord (optional extra)
# ----------------------------------------------------------------------------------------------


def _decord_is_importable() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


class _DecordDecoder:
    """Decodes the selected frames in batches with decord.VideoReader.

    Refuses (VideoDecodeError) at open what it cannot read the way PyAV does, so that "auto"
    uses PyAV instead (found with eva-decord 0.6.1):
    - rotated video: decord rotates by itself, 180 degrees correctly, but 90/270 crash inside
      decord ("DECORDArrayCopyFromTo: The size must exactly match") or, given an explicit
      size, come out squashed;
    - an index that disagrees with the demuxed one (frame count, or a start time more than
      DECORD_TIMESTAMP_TOLERANCE_S off), e.g. MPEG-PS, raw .h264 and IVF.
    Some files pass that check and still fail to decode: decord gives up near the end of an
    MPEG-TS ("Unable to handle EOF"). With a `fallback` ("auto"), PyAV then decodes the
    remaining frames; without one, the failure is raised.
    Frames are reported with the exact demuxed timestamps (decord's are float32), so both
    backends plan identical indices.
    """

    name = "decord"

    def __init__(self, path: str, index: _StreamIndex, timeout_s: float, fallback: _PyAVDecoder | None) -> None:
        try:
            import decord
        except ImportError as error:
            raise ImportError(
                "the decord backend needs the decord extra: pip install vidsieve[decord]"
            ) from error
        self.path, self.index, self.timeout_s = path, index, timeout_s
        if index.meta.rotation_deg:
            rotation = f"{index.meta.rotation_deg} deg"
            raise _decode_error(path, f"the decord backend cannot read rotated video ({rotation}); use backend='pyav'")
        with self._decord_errors(decord):
            self._reader = decord.VideoReader(path, ctx=decord.cpu(0))
            start_times_s = self._reader.get_frame_timestamp(range(len(self._reader)))[:, 0]  # [N] float32
        if len(start_times_s) != len(index.timestamps_s):
            raise _decode_error(
                path, f"decord reads {len(start_times_s)} frames where the container holds {len(index.timestamps_s)}"
            )
        drift_s = float(np.max(np.abs(start_times_s - np.asarray(index.timestamps_s))))
        if drift_s > DECORD_TIMESTAMP_TOLERANCE_S:
            raise _decode_error(path, f"decord's frame timestamps are off by up to {drift_s:.4f} s")
        self._decord = decord
        self._fallback = fallback

    def frames(self, selected: Sequence[int]) -> Iterator[Frame]:
        budget = _DecodeBudget(self.path, self.timeout_s)
        for start in range(0, len(selected), DECORD_BATCH_FRAMES):
            budget.check()
            batch_indices = list(selected[start : start + DECORD_BATCH_FRAMES])
            try:
                with self._decord_errors(self._decord):
                    batch = self._reader.get_batch(batch_indices).asnumpy()  # [B, H, W, 3] uint8
            except VideoDecodeError:
                if self._fallback is None:
                    raise
                yield from self._fallback.frames(selected[start:])
                return
            for index, rgb in zip(batch_indices, batch):
                with budget.paused():
                    yield Frame(rgb=rgb, timestamp_s=self.index.timestamps_s[index], index=index)

    @contextmanager
    def _decord_errors(self, decord: Any) -> Iterator[None]:
        try:
            yield
        except (decord.DECORDError, RuntimeError, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise _decode_error(self.path, f"decord failed (truncated or corrupt?): {first_line}") from error
