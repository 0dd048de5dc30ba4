"""Media of a request -> PIL frames, under the operator's policy, before any model work.

A medium is a URL:
- `data:image/...;base64,...` or `data:video/mp4|webm|...;base64,...` (videos decoded at the processor's FPS,
  1 by default, up to its `max_frames`, by `flamingo.video`);
- a local path (`/abs/path.png`, `rel/path.mp4` or `file://...`), only under the `--media-root` directory: the path is
  resolved (symlinks and `..` included) and refused when it leaves the root;
- `http(s)://...`, only with `--allow-remote-media` (fetched with a timeout and the body size limit).
Every image and video frame must have at most `max_pixels` pixels, read from the file's header before decoding
(decompression bombs stop there). Errors are `APIError`s (400) that say which medium and why.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image

from ..processing import VIDEO_EXTENSIONS
from ..video import decode_video
from .protocol import APIError

Frames = Union[Image.Image, list[Image.Image]]
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class MediaPolicy:
    root: Optional[Path] = None  # local paths are read only under it
    allow_remote: bool = False
    max_pixels: int = 20_000_000  # per image or video frame
    max_bytes: int = 50 * 2**20  # a remote file's size
    remote_timeout: float = 10.0


def load_medium(url: str, policy: MediaPolicy, *, video: bool = False, fps: float = 1.0,
                max_frames: int = 8, where: str = "media") -> Frames:
    """One medium's URL -> a PIL image, or a list of frames for a video."""
    try:
        data, is_video, name = _read(url, policy, video, where)
        if is_video:
            _check_video(data, policy.max_pixels, name)
            return decode_video(data, fps=fps, max_frames=max_frames)
        return _decode_image(data, policy.max_pixels, name)
    except APIError:
        raise
    except ValueError as e:
        raise APIError(400, f"{where}: {e}", param="messages") from None


def _read(url: str, policy: MediaPolicy, video: bool, where: str) -> tuple[bytes, bool, str]:
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if m is None:
            raise APIError(400, f"{where}: malformed data URL (expected data:<mime>;base64,<data>)")
        mime = (m["mime"] or "").lower()
        payload = url[m.end():]
        try:
            data = base64.b64decode(payload, validate=True) if m["b64"] else urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL's base64 does not decode") from None
        if not (mime.startswith("image/") or mime.startswith("video/")):
            raise APIError(400, f"{where}: unsupported media type {mime or 'none'!r} (image/* or video/*)")
        return data, video or mime.startswith("video/"), f"{where} ({mime})"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise APIError(400, f"{where}: remote media URLs are refused by this server (--allow-remote-media)")
        return _fetch(url, policy, video, where)
    if scheme not in ("", "file"):
        raise APIError(400, f"{where}: unsupported URL scheme {scheme!r} (data:, a local path, or http(s))")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
    resolved = _under_root(path, policy.root, where)
    with open(resolved, "rb") as f:
        data = f.read()
    return data, video or resolved.suffix.lower() in VIDEO_EXTENSIONS, f"{where} ({resolved.name})"


def _under_root(path: str, root: Optional[Path], where: str) -> Path:
    if root is None:
        raise APIError(400, f"{where}: local paths are refused by this server (it has no --media-root)")
    base = root.resolve()
    resolved = (base / path).resolve()  # an absolute `path` replaces the base; `..` and symlinks are resolved
    if resolved != base and base not in resolved.parents:
        raise APIError(400, f"{where}: the path {path!r} is outside the server's media root")
    if not resolved.is_file():
        raise APIError(400, f"{where}: no file {path!r} under the media root")
    return resolved


def _fetch(url: str, policy: MediaPolicy, video: bool, where: str) -> tuple[bytes, bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=policy.remote_timeout) as response:  # noqa: S310 (operator's opt-in)
            data = response.read(policy.max_bytes + 1)
            mime = (response.headers.get_content_type() or "").lower()
    except OSError as e:
        raise APIError(400, f"{where}: cannot fetch {url!r}: {e}") from None
    if len(data) > policy.max_bytes:
        raise APIError(400, f"{where}: {url!r} is larger than {policy.max_bytes} bytes")
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    return data, video or mime.startswith("video/") or suffix in VIDEO_EXTENSIONS, f"{where} ({url})"


def _decode_image(data: bytes, max_pixels: int, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size  # from the header: nothing decoded yet
                if width * height > max_pixels:
                    raise APIError(400, f"{name}: {width}x{height} is more than the server's {max_pixels} pixels "
                                        "per image")
                return im.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise APIError(400, f"{name}: refused as a decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types for files that are not images
        raise APIError(400, f"{name}: not a decodable image ({type(e).__name__}: {e})") from None


def _check_video(data: bytes, max_pixels: int, name: str) -> None:
    import av  # the video extra; imported when a video comes

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise APIError(400, f"{name}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
    except APIError:
        raise
    except Exception as e:
        raise APIError(400, f"{name}: not a decodable video ({type(e).__name__}: {e})") from None
    if width * height > max_pixels:
        raise APIError(400, f"{name}: {width}x{height} frames are more than the server's {max_pixels} pixels")
