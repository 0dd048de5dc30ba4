"""The file formats media are read in, for every reader of media from clients and datasets (the server, training
rows, `flamingo data pack`). Each reader is limited to these because the others do more than decode the bytes they
are given: Pillow's EPS reader runs Ghostscript on the file's PostScript, its ICO reader decodes the largest icon
(a PNG of any size) before the image's size can be checked, and FFmpeg's concat, SDP and HLS demuxers open the
files, sockets and URLs the file names."""

from __future__ import annotations

import os
import threading
import warnings
from typing import IO, TYPE_CHECKING, Union

if TYPE_CHECKING:
    from PIL import Image as PILImage

# Pillow's raster readers (its format names, as `Image.open(..., formats=...)` takes them; each must be one of
# `PIL.Image.OPEN`). JPEG's reader opens MPO too (a JPEG holding a second image); PNG's opens APNG.
_IMAGE_READERS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF",
                  "AVIF": "AVIF", "PPM": "PPM"}  # Pillow's name -> the name a message gives
IMAGE_FORMATS: tuple[str, ...] = tuple(_IMAGE_READERS)
*_FIRST, _LAST = _IMAGE_READERS.values()
IMAGE_FORMAT_NAMES = f"{', '.join(_FIRST)} and {_LAST}"  # (APNG: PNG's reader)

# FFmpeg's demuxers of the containers `flamingo.processing.VIDEO_EXTENSIONS` names, MPEG-TS, NUT, Ogg and GIF (each
# demuxer by all the names it goes by, as `InputContainer.format.name` lists them).
VIDEO_CONTAINERS: tuple[str, ...] = (
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2",  # MP4, MOV, 3GP
    "matroska", "webm",
    "avi",
    "mpeg", "mpegts", "mpegvideo",  # MPEG program and transport streams; a bare MPEG-1/2 video stream (.mpg)
    "m4v",  # a bare MPEG-4 part 2 video stream
    "flv",
    "asf",  # WMV
    "nut",
    "ogg",
    "gif",  # (the server and the loaders read GIFs with Pillow; `decode_video` reads one as any video)
)
VIDEO_CONTAINER_NAMES = "MP4, MOV, 3GP, Matroska, WebM, AVI, MPEG-PS, MPEG-TS, FLV, WMV, NUT, Ogg and GIF"


def image_formats() -> tuple[str, ...]:
    """`IMAGE_FORMATS` this Pillow reads, for `Image.open(..., formats=...)`, which raises KeyError at a format it has
    no reader for (AVIF's is Pillow 11.2's on)."""
    from PIL import Image

    Image.init()  # every reader registered
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


# Held while Pillow's DecompressionBombWarning is silenced (`open_image`): warnings' filters are one list for the
# whole process, and two threads' `catch_warnings` blocks that overlap restore each other's filters, leaving one in
# place for good. Only a file's header is read under it.
_SILENCED = threading.Lock()


def _fresh_lock_after_fork() -> None:
    """A forked child (a DataLoader worker) has one thread: the lock another thread of the parent held at the fork
    would stay held there for good."""
    global _SILENCED
    _SILENCED = threading.Lock()


if hasattr(os, "register_at_fork"):  # (no fork on Windows)
    os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def open_image(source: Union[str, IO[bytes]]) -> "PILImage.Image":
    """`Image.open(source)` with `image_formats()`' readers only, without Pillow's DecompressionBombWarning for an
    image over its `MAX_IMAGE_PIXELS` and below twice it: every reader checks the size itself and refuses with the
    size and its own cap (`image_frames`, the server's), so the warning would only come first. Over twice it Pillow
    still raises DecompressionBombError."""
    from PIL import Image

    with _SILENCED, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source, formats=image_formats())
