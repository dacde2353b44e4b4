"""Tiny synthetic videos for the streaming tests, written with PyAV into a temp folder.

Frame k of every clip is a flat grey of `marker_value(k)`, so a test can tell which source
frame came back by the mean of a pixel region. Clips with `corner_marker=True` also carry
a white square in the top-left corner of the stored (un-rotated) picture, so a test can tell
which way a frame was turned.
"""

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CORNER_PX = 8


def marker_value(frame_index: int) -> int:
    """The grey level of frame `frame_index`: 20, 28, 36, ... (distinct for <= 29 frames)."""
    return 20 + 8 * frame_index


def frame_index_from_rgb(rgb: np.ndarray) -> int:
    """Which source frame a decoded `[H, W, 3]` picture shows, read from its centre region."""
    height, width, _ = rgb.shape
    centre = rgb[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4]
    return round((float(centre.mean()) - 20) / 8)


def write_video(
    path: Path,
    *,
    codec: str = "libx264",
    frame_count: int = 10,
    fps: int = 10,
    width: int = 64,
    height: int = 48,
    pix_fmt: str = "yuv420p",
    pts_ms: Sequence[int] | None = None,
    rotation_deg: int = 0,
    corner_marker: bool = False,
    noisy_border: bool = False,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> list[float]:
    """Encode a clip and return the presentation time of each frame in seconds.

    `pts_ms` gives an explicit presentation time per frame (variable frame rate, time base
    1/1000); otherwise frames are `1/fps` apart. `rotation_deg` is written as the stream's
    display matrix, counter-clockwise, the convention `VideoFrame.rotation` reads back.
    `noisy_border` fills the bottom quarter with noise so packets have realistic sizes (a
    file cut in half then loses half its frames, not just a header).
    `options` go to the encoder, `container_options` to the muxer (e.g. mp4 faststart).
    """
    if pts_ms is not None:
        frame_count = len(pts_ms)
    time_base = Fraction(1, 1000) if pts_ms is not None else Fraction(1, fps)
    noise = np.random.default_rng(0)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        if rotation_deg:
            stream.set_display_rotation(rotation_deg)
        for k in range(frame_count):
            rgb = np.full((height, width, 3), marker_value(k), np.uint8)  # [H, W, 3]
            if corner_marker:
                rgb[:CORNER_PX, :CORNER_PX] = 255
            if noisy_border:
                rgb[3 * height // 4 :] = noise.integers(0, 256, rgb[3 * height // 4 :].shape, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = pts_ms[k] if pts_ms is not None else k
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return [float(Fraction(t) * time_base) for t in (pts_ms or range(frame_count))]


def write_audio_only(path: Path) -> None:
    """A half-second silent AAC track in an .m4a file: a valid container with no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
