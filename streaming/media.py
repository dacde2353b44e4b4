"""Media a client sends as bytes: still images (JPEG, PNG) and whole video files.

The front doors receive bytes (a WebSocket frame, a data URL, a fetched URL); this module is
where they become pixels, with the size limits checked BEFORE any pixel is decoded, so a
small file that claims to be a 100k x 100k image never allocates one.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings

import numpy as np

from kernels.errors import VidsieveError
from streaming.video import SamplingPlan, open_video

IMAGE_FORMATS = ("JPEG", "PNG")


class MediaError(VidsieveError):
    """Bytes that are not a readable image or video, or one over the size limits."""


def decode_image(data: bytes, *, max_side_px: int) -> np.ndarray:
    """JPEG or PNG bytes -> RGB uint8 [H, W, 3]. Raises MediaError for anything else, for a
    corrupt or truncated file, and for an image wider or taller than `max_side_px`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise MediaError(f"image format {image.format or 'unknown'} is not accepted; send JPEG or PNG")
            width, height = image.size
            if max(width, height) > max_side_px or min(width, height) < 1:
                raise MediaError(f"image is {width}x{height} px; the limit is {max_side_px} px a side")
            rgb = np.array(image.convert("RGB"))  # a writable copy
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise MediaError(f"cannot decode the image: {type(error).__name__}: {str(error)[:200]}") from None
    return rgb


def read_video(path: str | os.PathLike, plan: SamplingPlan, *, max_side_px: int, timeout_s: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """The frames `plan` selects from a video file: (uint8 [T, H, W, 3], timestamps_s float64 [T]).
    Raises MediaError for frames over `max_side_px`, VideoDecodeError / SamplingPlanError
    (both VidsieveErrors) for unreadable files and plans that select nothing."""
    video = open_video(path, plan, timeout_s=timeout_s)
    if max(video.meta.width, video.meta.height) > max_side_px:
        raise MediaError(f"video is {video.meta.width}x{video.meta.height} px; the limit is {max_side_px} px a side")
    frames = video.read_all()
    return np.stack([frame.rgb for frame in frames]), np.array([frame.timestamp_s for frame in frames])


def read_video_bytes(data: bytes, plan: SamplingPlan, *, max_side_px: int, timeout_s: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`read_video` of a file held in memory (a data URL, a download)."""
    with tempfile.NamedTemporaryFile(prefix="vidsieve-", suffix=".video") as file:
        file.write(data)
        file.flush()
        try:
            return read_video(file.name, plan, max_side_px=max_side_px, timeout_s=timeout_s)
        except VidsieveError as error:  # name the upload, not our temporary file
            raise type(error)(str(error).replace(repr(file.name), "the uploaded video")) from None
