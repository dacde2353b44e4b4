"""Where the HTTP API's image_url and video_url parts come from, and the frames they give.

- `data:<mime>;base64,<payload>` URLs: always accepted, up to `max_media_bytes` decoded.
- Local paths (`/abs/path`, `relative/path`, `file:///abs/path`): only under `media_root`,
  after resolving `..` and symlinks; without a media root, never.
- `http(s)://` URLs: only with `allow_remote_media`, fetched with a size cap and a deadline.
  Redirects are not followed (a redirect is an easy way into an internal network).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import numpy as np

from kernels.errors import VidsieveError
from server.schemas import ImagePart, VideoPart
from server.settings import Settings
from streaming.media import MediaError, decode_image, read_video, read_video_bytes
from streaming.video import SamplingPlan


class MediaAccessError(VidsieveError):
    """A media URL this server may not read: a path outside the media root, or a kind of URL
    that is disabled."""


class MediaTooLargeError(VidsieveError):
    """A media file over `max_media_bytes`."""


async def load_media(url: str, settings: Settings) -> bytes | Path:
    """The bytes of a data or http(s) URL, or the path of a local file under the media root."""
    if url.startswith("data:"):
        return decode_data_url(url, settings.max_media_bytes)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not settings.allow_remote_media:
            raise MediaAccessError("http(s) media URLs are disabled on this server; send a data: URL")
        return await fetch_url(url, settings.max_media_bytes, settings.remote_media_timeout_s)
    if scheme not in ("", "file"):
        raise MediaAccessError(f"media URL scheme {scheme!r} is not supported; use data:, a path or http(s)")
    path = local_media_path(unquote(urlparse(url).path) if scheme == "file" else url, settings.media_root)
    if path.stat().st_size > settings.max_media_bytes:
        raise MediaTooLargeError(f"media file is over the {settings.max_media_bytes} byte limit")
    return path


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaError("a data URL must look like data:<mime type>;base64,<payload>")
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaTooLargeError(f"media is over the {max_bytes} byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL's payload is not valid base64") from None


def local_media_path(path: str, media_root: Path | None) -> Path:
    if media_root is None:
        raise MediaAccessError("local media paths are disabled on this server (no media root); send a data: URL")
    root = media_root.resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise MediaAccessError(f"media path {path!r} is outside the media root")
    if not resolved.is_file():
        raise MediaError(f"media path {path!r} is not a file under the media root")
    return resolved


async def fetch_url(url: str, max_bytes: int, timeout_s: float) -> bytes:
    async def download() -> bytes:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(f"fetching {url!r} gave HTTP {response.status_code}")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise MediaTooLargeError(f"{url!r} is over the {max_bytes} byte limit")
                    chunks.append(chunk)
                return b"".join(chunks)

    try:
        return await asyncio.wait_for(download(), timeout_s)
    except (httpx.HTTPError, asyncio.TimeoutError) as error:
        raise MediaError(f"cannot fetch {url!r}: {type(error).__name__}") from None


async def load_frames(parts: list[ImagePart | VideoPart], plan: SamplingPlan, settings: Settings
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and timestamps [T] of either one video or a list of images
    (taken as frames one second apart)."""
    videos = [part for part in parts if isinstance(part, VideoPart)]
    if not parts:
        raise MediaError("send at least one image_url or video_url part with the question")
    if videos and len(parts) > 1:
        raise MediaError("send either one video_url or image_url parts, not both or several videos")
    if len(parts) > settings.max_video_frames:
        raise MediaError(f"{len(parts)} images; the limit is {settings.max_video_frames}")
    if videos:
        source = await load_media(videos[0].video_url.url, settings)
        read = read_video if isinstance(source, Path) else read_video_bytes
        return await asyncio.to_thread(read, source, plan, max_side_px=settings.max_frame_side_px,
                                       timeout_s=settings.remote_media_timeout_s)
    images = []
    for part in parts:
        source = await load_media(part.image_url.url, settings)
        data = await asyncio.to_thread(source.read_bytes) if isinstance(source, Path) else source
        images.append(await asyncio.to_thread(decode_image, data, max_side_px=settings.max_frame_side_px))
    if len({image.shape for image in images}) > 1:
        raise MediaError("images in one request must all have the same size")
    return np.stack(images), np.arange(len(images), dtype=np.float64)
