"""streaming/video.py: sampling plans, timestamps, codecs, rotation, decord parity, bad input.

Every clip is encoded here with PyAV (tests/video_fixtures.py); frame k is a flat grey whose
level says k, so each test checks WHICH frame came back, not just how many.
"""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import streaming.video as video_module
from kernels.errors import VidsieveError
from streaming import (
    SamplingPlan,
    SamplingPlanError,
    VideoDecodeError,
    open_video,
    plan_frame_indices,
)
from tests.video_fixtures import CORNER_PX, frame_index_from_rgb, write_audio_only, write_video

pytestmark = pytest.mark.timeout(60)

VFR_PTS_MS = [0, 40, 100, 110, 300, 310, 320, 700, 1000, 1033]
VFR_TIMESTAMPS_S = [t / 1000 for t in VFR_PTS_MS]
CFR_10FPS_S = [k / 10 for k in range(10)]

try:
    import decord
except ImportError:
    decord = None
needs_decord = pytest.mark.skipif(decord is None, reason="decord is not installed (pip install vidsieve[decord])")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """The clips several tests share, encoded once per module."""
    folder = tmp_path_factory.mktemp("clips")
    x265_quiet = {"x265-params": "log-level=error"}
    specs = {
        "h264.mp4": dict(frame_count=10, fps=10),
        "h264_30.mp4": dict(frame_count=30, fps=30),
        "vp9.webm": dict(codec="libvpx-vp9", frame_count=10, fps=10),
        "mpeg4.avi": dict(codec="mpeg4", frame_count=10, fps=10),
        "hevc.mkv": dict(codec="libx265", frame_count=10, fps=10, options=x265_quiet),
        "vfr.mp4": dict(pts_ms=VFR_PTS_MS),
        "vfr.mkv": dict(pts_ms=VFR_PTS_MS),
        "hevc10.mkv": dict(codec="libx265", pix_fmt="yuv420p10le", options=x265_quiet),
        "h264_10.mp4": dict(pix_fmt="yuv420p10le"),
        "odd_h264_444.mp4": dict(width=33, height=17, pix_fmt="yuv444p"),
        "odd_ffv1_420.mkv": dict(codec="ffv1", width=33, height=17, pix_fmt="yuv420p"),
        "mpegts.ts": dict(frame_count=12, fps=10),
    }
    for name, spec in specs.items():
        write_video(folder / name, **spec)
    return {name: folder / name for name in specs}


def assert_frames_show_their_index(frames) -> None:
    for frame in frames:
        assert frame.rgb.dtype == np.uint8 and frame.rgb.ndim == 3 and frame.rgb.shape[2] == 3
        assert frame.rgb.flags["C_CONTIGUOUS"]
        assert frame_index_from_rgb(frame.rgb) == frame.index, f"frame {frame.index} shows other content"


# ---------------------------------------------------------------------------------------------
# plan_frame_indices: the pure sampling rule
# ---------------------------------------------------------------------------------------------


def test_a_plan_without_rate_or_count_selects_every_frame_in_the_half_open_window():
    assert plan_frame_indices(CFR_10FPS_S, SamplingPlan()) == list(range(10))
    assert plan_frame_indices(CFR_10FPS_S, SamplingPlan(start_s=0.25, end_s=0.6)) == [3, 4, 5]
    assert plan_frame_indices(CFR_10FPS_S, SamplingPlan(start_s=0.3)) == [3, 4, 5, 6, 7, 8, 9]


def test_fps_takes_the_first_frame_at_or_after_each_target_time():
    cfr_30fps_s = [k / 30 for k in range(30)]
    assert plan_frame_indices(cfr_30fps_s, SamplingPlan(fps=10)) == list(range(0, 30, 3))
    # Targets 0, 0.1, ..., 1.0 over irregular frames: 0.2 takes 0.3 (frame 4), 0.4 takes 0.7.
    assert plan_frame_indices(VFR_TIMESTAMPS_S, SamplingPlan(fps=10)) == [0, 2, 4, 7, 8]
    assert plan_frame_indices(CFR_10FPS_S, SamplingPlan(fps=2, start_s=0.25)) == [3, 8]


def test_fps_above_the_native_rate_returns_each_frame_once():
    assert plan_frame_indices(VFR_TIMESTAMPS_S, SamplingPlan(fps=1000)) == list(range(10))


def test_num_frames_takes_the_frame_nearest_each_segment_centre_in_time_not_in_index():
    # Span [0, 1.033] in 3 segments: centres 0.172, 0.517, 0.861 -> 0.11, 0.7, 1.0.
    # Uniform in index would have given [1, 4, 8].
    assert plan_frame_indices(VFR_TIMESTAMPS_S, SamplingPlan(num_frames=3)) == [3, 7, 8]


def test_num_frames_equal_to_the_frame_count_returns_every_constant_rate_frame():
    assert plan_frame_indices([k / 30 for k in range(30)], SamplingPlan(num_frames=30)) == list(range(30))


def test_num_frames_spreads_over_the_requested_window():
    twenty_frames_s = [k / 10 for k in range(20)]
    # [0.5, 1.0) in 2 segments: centres 0.625 and 0.875 -> frames at 0.6 and 0.9.
    assert plan_frame_indices(twenty_frames_s, SamplingPlan(num_frames=2, start_s=0.5, end_s=1.0)) == [6, 9]


def test_num_frames_beyond_the_frame_count_never_repeats_a_frame():
    assert plan_frame_indices([0.0, 0.5, 1.0], SamplingPlan(num_frames=50)) == [0, 1, 2]


def test_max_frames_keeps_a_uniform_subset_of_the_selection():
    assert plan_frame_indices(CFR_10FPS_S, SamplingPlan(max_frames=5)) == [1, 3, 5, 7, 9]
    assert plan_frame_indices([k / 30 for k in range(30)], SamplingPlan(fps=10, max_frames=2)) == [6, 21]
    assert plan_frame_indices(CFR_10FPS_S, SamplingPlan(max_frames=50)) == list(range(10))


def test_a_window_past_the_last_frame_selects_nothing():
    assert plan_frame_indices(CFR_10FPS_S, SamplingPlan(start_s=5.0)) == []
    assert plan_frame_indices([], SamplingPlan(num_frames=4)) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fps=2, num_frames=4),
        dict(fps=0),
        dict(fps=-1.0),
        dict(fps=math.nan),
        dict(num_frames=0),
        dict(num_frames=2.5),
        dict(max_frames=True),
        dict(start_s=-1.0),
        dict(start_s=2.0, end_s=2.0),
        dict(end_s=math.inf),
    ],
)
def test_contradictory_or_out_of_range_plans_raise_a_typed_error_that_is_not_value_error(kwargs):
    with pytest.raises(SamplingPlanError) as caught:
        SamplingPlan(**kwargs)
    assert isinstance(caught.value, VidsieveError) and not isinstance(caught.value, ValueError)


# ---------------------------------------------------------------------------------------------
# Decoding with PyAV: codecs, containers, timestamps, metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, codec",
    [("h264.mp4", "h264"), ("vp9.webm", "vp9"), ("mpeg4.avi", "mpeg4"), ("hevc.mkv", "hevc")],
)
def test_every_encoded_frame_comes_back_with_its_timestamp_and_content(clips, name, codec):
    video = open_video(clips[name], backend="pyav")
    frames = video.read_all()

    assert video.backend == "pyav"
    assert video.meta.codec == codec
    assert (video.meta.width, video.meta.height, video.meta.rotation_deg) == (64, 48, 0)
    assert video.meta.frame_count == 10 and video.meta.native_fps == pytest.approx(10)
    assert video.meta.duration_s == pytest.approx(1.0, abs=0.15)
    assert video.timestamps_s == pytest.approx(CFR_10FPS_S, abs=1e-6)
    assert [frame.index for frame in frames] == list(range(10))
    assert [frame.timestamp_s for frame in frames] == pytest.approx(CFR_10FPS_S, abs=1e-6)
    assert all(frame.rgb.shape == (48, 64, 3) for frame in frames)
    assert_frames_show_their_index(frames)


@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.mkv"])
def test_variable_frame_rate_timestamps_are_the_encoded_presentation_times(clips, name):
    video = open_video(clips[name], backend="pyav")
    assert video.timestamps_s == pytest.approx(VFR_TIMESTAMPS_S, abs=1e-6)
    assert_frames_show_their_index(video.read_all())


def test_num_frames_on_a_variable_frame_rate_file_samples_by_time(clips):
    frames = open_video(clips["vfr.mkv"], backend="pyav", num_frames=3).read_all()
    assert [frame.index for frame in frames] == [3, 7, 8]
    assert [frame.timestamp_s for frame in frames] == pytest.approx([0.11, 0.7, 1.0], abs=1e-6)
    assert_frames_show_their_index(frames)


def test_fps_window_and_cap_select_the_planned_frames_from_a_file(clips):
    path = clips["h264_30.mp4"]
    video = open_video(path, backend="pyav", fps=10, start_s=0.5, end_s=0.9)
    assert video.selected_indices == (15, 18, 21, 24)
    assert_frames_show_their_index(video.read_all())

    capped = open_video(path, SamplingPlan(max_frames=3), backend="pyav")
    assert capped.selected_indices == (5, 15, 25) and len(capped) == 3
    assert_frames_show_their_index(capped.read_all())


def test_a_video_can_be_iterated_twice_with_the_same_frames(clips):
    video = open_video(clips["h264.mp4"], backend="pyav", num_frames=4)
    first, second = list(video), list(video)
    assert [f.index for f in first] == [f.index for f in second] == list(video.selected_indices)
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(first, second))


def test_seeking_ahead_returns_the_same_frames_as_decoding_straight_through(tmp_path, monkeypatch):
    path = tmp_path / "gaps.mp4"
    gaps_ms = [0, 100, 200, 2500, 2600, 2700, 6000, 6100, 9000, 9400, 12000, 12033, 15000]
    write_video(path, pts_ms=gaps_ms, options={"g": "3"})  # a keyframe every 3 frames
    straight = [(f.index, f.rgb) for f in open_video(path, backend="pyav", max_frames=7)]

    seeks = []
    real_decoded_frames = video_module._decoded_frames

    def spy(container, stream, budget, seek_pts=None):
        seeks.append(seek_pts)
        return real_decoded_frames(container, stream, budget, seek_pts)

    monkeypatch.setattr(video_module, "_decoded_frames", spy)
    monkeypatch.setattr(video_module, "SEEK_AHEAD_S", 0.0)  # seek before every selected frame
    seeked = [(f.index, f.rgb) for f in open_video(path, backend="pyav", max_frames=7)]

    # Keyframes at frames 0, 3, 6, 9, 12: frames 4, 6, 10 and 12 are reached by seeking (a
    # keyframe lies ahead), and no seek misses (that would restart decoding: a second None).
    assert seeks == [None, 40000, 96000, 150400, 240000]
    assert [i for i, _ in seeked] == [i for i, _ in straight] == [0, 2, 4, 6, 8, 10, 12]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(seeked, straight))
    assert all(frame_index_from_rgb(rgb) == i for i, rgb in seeked)


def test_a_container_without_a_seek_index_is_decoded_straight_through(clips, monkeypatch):
    monkeypatch.setattr(video_module, "SEEK_AHEAD_S", 0.0)
    video = open_video(clips["mpegts.ts"], backend="pyav", num_frames=4)
    assert_frames_show_their_index(video.read_all())
    assert video.timestamps_s == pytest.approx([k / 10 for k in range(12)], abs=1e-6)


def test_a_raw_elementary_stream_without_timestamps_is_timed_by_its_frame_rate(tmp_path):
    path = tmp_path / "raw.h264"
    write_video(path, frame_count=10, fps=10)
    video = open_video(path, backend="pyav")
    assert len(video.timestamps_s) == 10
    assert video.timestamps_s == pytest.approx([k / video.meta.native_fps for k in range(10)])
    assert_frames_show_their_index(video.read_all())


# ---------------------------------------------------------------------------------------------
# Rotation, bit depth, odd sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rotation_deg, corner",
    [(90, "bottom_left"), (180, "bottom_right"), (270, "top_right"), (-90, "top_right")],
)
def test_a_rotated_clip_comes_back_upright_with_width_and_height_swapped(tmp_path, rotation_deg, corner):
    # The clip stores a white square top-left and a display matrix saying "turn me
    # counter-clockwise by rotation_deg" (PyAV's set_display_rotation). Turning the picture
    # 90 degrees counter-clockwise carries its top-left corner to the bottom-left.
    path = tmp_path / f"rotated_{rotation_deg}.mp4"
    write_video(path, frame_count=3, rotation_deg=rotation_deg, corner_marker=True)
    video = open_video(path)
    frames = video.read_all()

    quarter_turn = rotation_deg % 180 != 0
    expected_height, expected_width = (64, 48) if quarter_turn else (48, 64)
    assert video.backend == "pyav"  # auto avoids decord on rotated video
    assert video.meta.rotation_deg == rotation_deg % 360
    assert (video.meta.height, video.meta.width) == (expected_height, expected_width)
    corners = {
        "top_left": (slice(0, CORNER_PX), slice(0, CORNER_PX)),
        "top_right": (slice(0, CORNER_PX), slice(-CORNER_PX, None)),
        "bottom_left": (slice(-CORNER_PX, None), slice(0, CORNER_PX)),
        "bottom_right": (slice(-CORNER_PX, None), slice(-CORNER_PX, None)),
    }
    for frame in frames:
        assert frame.rgb.shape == (expected_height, expected_width, 3)
        for name, region in corners.items():
            is_white = frame.rgb[region].mean() > 200
            assert is_white == (name == corner), f"corner {name} of frame {frame.index}"
    assert_frames_show_their_index(frames)


@pytest.mark.parametrize("name", ["hevc10.mkv", "h264_10.mp4"])
def test_ten_bit_video_decodes_to_eight_bit_rgb(clips, name):
    video = open_video(clips[name], backend="pyav")
    frames = video.read_all()
    assert len(frames) == 10 and all(frame.rgb.shape == (48, 64, 3) for frame in frames)
    assert_frames_show_their_index(frames)


@pytest.mark.parametrize("name", ["odd_h264_444.mp4", "odd_ffv1_420.mkv"])
def test_odd_sized_video_decodes_to_contiguous_rgb_of_the_exact_size(clips, name):
    video = open_video(clips[name], backend="pyav")
    frames = video.read_all()
    assert (video.meta.width, video.meta.height) == (33, 17)
    assert all(frame.rgb.shape == (17, 33, 3) for frame in frames)
    assert_frames_show_their_index(frames)


# ---------------------------------------------------------------------------------------------
# decord
# ---------------------------------------------------------------------------------------------


@needs_decord
@pytest.mark.parametrize("name", ["h264.mp4", "vfr.mkv", "vp9.webm", "hevc10.mkv", "odd_ffv1_420.mkv"])
@pytest.mark.parametrize(
    "plan", [SamplingPlan(fps=4), SamplingPlan(num_frames=5), SamplingPlan(max_frames=3, start_s=0.1, end_s=0.9)]
)
def test_decord_selects_and_decodes_the_same_frames_as_pyav(clips, name, plan):
    with_pyav = open_video(clips[name], plan, backend="pyav")
    with_decord = open_video(clips[name], plan, backend="decord")
    decord_start_times_s = decord.VideoReader(str(clips[name])).get_frame_timestamp(range(10))[:, 0]

    assert with_decord.backend == "decord"
    assert np.allclose(decord_start_times_s, with_pyav.timestamps_s, atol=1e-3)
    assert with_decord.selected_indices == with_pyav.selected_indices
    pyav_frames, decord_frames = with_pyav.read_all(), with_decord.read_all()
    assert [f.timestamp_s for f in decord_frames] == pytest.approx([f.timestamp_s for f in pyav_frames], abs=1e-3)
    for a, b in zip(pyav_frames, decord_frames):
        assert a.index == b.index and a.rgb.shape == b.rgb.shape
        assert np.abs(a.rgb.astype(int) - b.rgb.astype(int)).mean() < 3
    assert_frames_show_their_index(decord_frames)


@needs_decord
def test_auto_prefers_decord_and_falls_back_to_pyav_where_decord_fails(clips):
    assert open_video(clips["h264.mp4"]).backend == "decord"
    # decord indexes this MPEG-TS right but gives up decoding it ("Unable to handle EOF");
    # auto then decodes it with PyAV.
    with pytest.raises(VideoDecodeError, match="mpegts.ts.*decord failed"):
        open_video(clips["mpegts.ts"], backend="decord").read_all()
    frames = open_video(clips["mpegts.ts"]).read_all()
    assert [frame.index for frame in frames] == list(range(12))
    assert_frames_show_their_index(frames)


@needs_decord
def test_the_decord_backend_refuses_rotated_video_with_a_clear_error(tmp_path):
    path = tmp_path / "rotated.mp4"
    write_video(path, frame_count=3, rotation_deg=90)
    with pytest.raises(VideoDecodeError, match="rotated.mp4.*rotated video"):
        open_video(path, backend="decord")


def test_asking_for_decord_without_it_installed_names_the_extra(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    with pytest.raises(ImportError, match=r"pip install vidsieve\[decord\]"):
        open_video(clips["h264.mp4"], backend="decord")
    assert open_video(clips["h264.mp4"]).backend == "pyav"


# ---------------------------------------------------------------------------------------------
# Bad input and the decoding deadline
# ---------------------------------------------------------------------------------------------


def _cut_in_half(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _missing(folder: Path) -> Path:
    return folder / "missing_clip.mp4"


def _empty(folder: Path) -> Path:
    path = folder / "empty_clip.mp4"
    path.touch()
    return path


def _text(folder: Path) -> Path:
    path = folder / "notes_clip.txt"
    path.write_text("this is a shopping list, not a video\n" * 20)
    return path


def _text_named_mp4(folder: Path) -> Path:
    path = folder / "fake_clip.mp4"
    path.write_text("this is a shopping list, not a video\n" * 20)
    return path


def _directory(folder: Path) -> Path:
    path = folder / "folder_clip.mp4"
    path.mkdir()
    return path


def _audio_only(folder: Path) -> Path:
    path = folder / "audio_clip.m4a"
    write_audio_only(path)
    return path


def _mp4_cut_before_its_index(folder: Path) -> Path:
    write_video(folder / "whole.mp4", frame_count=30, noisy_border=True)  # moov atom at the end
    return _cut_in_half(folder / "whole.mp4", folder / "cut_clip.mp4")


def _faststart_mp4_cut_in_half(folder: Path) -> Path:
    write_video(folder / "whole.mp4", frame_count=30, noisy_border=True, container_options={"movflags": "+faststart"})
    return _cut_in_half(folder / "whole.mp4", folder / "cut_faststart_clip.mp4")


def _mkv_cut_before_its_first_frame(folder: Path) -> Path:
    write_video(folder / "whole.mkv", frame_count=30)  # flat frames: half the file is mostly header
    return _cut_in_half(folder / "whole.mkv", folder / "cut_clip.mkv")


@pytest.mark.parametrize(
    "make_input, reason",
    [
        (_missing, "not found"),
        (_empty, "empty"),
        (_text, "not a video"),
        (_text_named_mp4, "not a video"),
        (_directory, "directory"),
        (_audio_only, "no video stream"),
        (_mp4_cut_before_its_index, "truncated"),
        (_faststart_mp4_cut_in_half, "truncated"),
        (_mkv_cut_before_its_first_frame, "no decodable video frames"),
    ],
)
@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_bad_input_raises_video_decode_error_naming_the_file_and_the_reason(tmp_path, make_input, reason, backend):
    path = make_input(tmp_path)
    with pytest.raises(VideoDecodeError) as caught:
        open_video(path, backend=backend).read_all()
    message = str(caught.value)
    assert path.name in message and reason in message
    assert isinstance(caught.value, VidsieveError)


def test_a_selected_frame_the_decoder_never_produces_raises_instead_of_being_skipped(clips, monkeypatch):
    real_decode_packet = video_module._decode_packet

    def decoder_rejecting_late_packets(packet):
        # Stands in for corrupt data: the decoder rejects every packet from 0.5 s on.
        late = packet.pts is not None and packet.pts * packet.time_base >= 0.5
        return [] if late else real_decode_packet(packet)

    monkeypatch.setattr(video_module, "_decode_packet", decoder_rejecting_late_packets)
    video = open_video(clips["mpeg4.avi"], backend="pyav", num_frames=3)  # frames 1, 4, 7
    frames = iter(video)
    assert next(frames).index == 1 and next(frames).index == 4
    with pytest.raises(VideoDecodeError, match=r"mpeg4.avi.*truncated or corrupt: frame 7"):
        next(frames)


def test_a_plan_that_selects_no_frame_raises_a_sampling_plan_error_naming_the_file(clips):
    with pytest.raises(SamplingPlanError, match="h264.mp4"):
        open_video(clips["h264.mp4"], start_s=30.0)
    with pytest.raises(SamplingPlanError, match="not both"):
        open_video(clips["h264.mp4"], SamplingPlan(fps=1), num_frames=3)


class FakeClock:
    """Stands in for streaming.video's time.monotonic: advances `tick_s` per reading, plus
    whatever a test adds to `now_s`."""

    def __init__(self, tick_s: float) -> None:
        self.now_s, self.tick_s = 0.0, tick_s

    def __call__(self) -> float:
        self.now_s += self.tick_s
        return self.now_s


def test_decoding_past_the_deadline_raises_video_decode_error(clips, monkeypatch):
    monkeypatch.setattr(video_module, "time", SimpleNamespace(monotonic=FakeClock(tick_s=1.0)))
    with pytest.raises(VideoDecodeError, match=r"h264.mp4.*took longer than 5 s"):
        open_video(clips["h264.mp4"], backend="pyav", timeout_s=5.0)


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_time_a_consumer_holds_a_frame_does_not_count_toward_the_deadline(clips, monkeypatch, backend):
    clock = FakeClock(tick_s=0.0)
    monkeypatch.setattr(video_module, "time", SimpleNamespace(monotonic=clock))
    video = open_video(clips["h264.mp4"], backend=backend, timeout_s=5.0)
    frames = []
    for frame in video:
        clock.now_s += 100.0  # a slow consumer
        frames.append(frame)
    assert len(frames) == 10

    clock.tick_s = 1.0  # now decoding itself is slow
    with pytest.raises(VideoDecodeError, match="took longer than 5 s"):
        video.read_all()
