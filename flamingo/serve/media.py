"""Media of a request -> PIL frames, under the operator's policy, before any model work.

A medium is a URL:
- `data:image/...;base64,...` or `data:video/mp4|webm|...;base64,...` (videos decoded at the processor's FPS,
  1 by default, up to its `max_frames`, by `flamingo.video`; an animated GIF, PNG or WebP is a video, whichever
  way it comes: `flamingo.processing.image_frames`);
- a local path (`/abs/path.png`, `rel/path.mp4` or `file://...`), only under the `--media-root` directory: the path is
  resolved (symlinks and `..` included) and refused when it leaves the root, the file when its size is over the body
  size limit (before it is read);
- `http(s)://...`, only with `--allow-remote-media` (the whole download, name lookups included, within the timeout,
  at most the body size limit), and only from public addresses unless `--allow-private-media-hosts`: the address
  each connection reaches (every redirect hop included, after DNS, so a name that resolves to an internal address is
  caught) must not be loopback, private, link-local or otherwise not global (an IPv6 address embedding an IPv4 one by
  that one); only http(s) redirects are followed.
Every image and video frame must have at most `max_pixels` pixels, read from the file's header before decoding
(decompression bombs stop there; every page of a multi-page TIFF by its own header, as it is reached), and for
a video from every decoded frame too (a stream may switch to larger frames after its header). A file no image reader
knows is tried as a video whatever its name or MIME type (MPEG-TS `.ts`, `.mts`, no suffix), as the processor reads
it. Only the image readers and video containers `flamingo.runtime.media_formats` lists are used: Pillow's EPS reader
runs Ghostscript, and FFmpeg's concat, SDP and HLS demuxers open the files, sockets and URLs a file names. Errors are
`APIError`s (400) that say which medium and why.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image, UnidentifiedImageError

from ..processing import VIDEO_EXTENSIONS, animatable_image, image_frames
from ..runtime.data_url import BARE_BASE64, decode_data_url, is_bare_base64, is_data_url, media_kind
from ..runtime.media_formats import IMAGE_FORMAT_NAMES, VIDEO_CONTAINER_NAMES, open_image
from ..video import TooLong, TooManyPixels, UnlistedContainer, decode_video, open_container
from .protocol import APIError

Frames = Union[Image.Image, list[Image.Image]]
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"heif")  # ISO BMFF brands


@dataclass(frozen=True)
class MediaPolicy:
    root: Optional[Path] = None  # local paths are read only under it
    allow_remote: bool = False
    allow_private: bool = False  # remote media from loopback, private and link-local addresses too
    max_pixels: int = 20_000_000  # per image or video frame
    max_bytes: int = 50 * 2**20  # a remote or local file's size
    remote_timeout: float = 10.0
    max_video_seconds: float = 600.0  # decoding time grows with a video's length (its memory does not)


def load_medium(url: str, policy: MediaPolicy, *, video: bool = False, fps: float = 1.0,
                max_frames: int = 8, where: str = "media", param: Optional[str] = None) -> Frames:
    """One medium's URL -> a PIL image, or a list of frames for a video. param: the request's field that holds it
    (`messages`, `media`, `input`), named by its errors."""
    try:
        data, is_video, name = _read(url, policy, video, where)
        if not data:
            raise APIError(400, f"{name}: the file is empty (0 bytes)")
        if is_video and not animatable_image(data):
            return _decode_video(data, policy, name, fps, max_frames)
        return _decode_image(data, policy, name, fps, max_frames)
    except APIError as e:
        e.param = e.param or param
        raise
    except ValueError as e:
        raise APIError(400, f"{where}: {e}", param=param) from None


def _read(url: str, policy: MediaPolicy, video: bool, where: str) -> tuple[bytes, bool, str]:
    if is_data_url(url):
        try:
            mime, data = decode_data_url(url)
            kind = media_kind(mime)
        except ValueError as e:
            raise APIError(400, f"{where}: {e}") from None
        return data, video or kind == "video", f"{where} ({mime})"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise APIError(400, f"{where}: remote media URLs are refused by this server (--allow-remote-media)")
        return _fetch(url, policy, video, where)
    if scheme not in ("", "file"):
        raise APIError(400, f"{where}: unsupported URL scheme {scheme!r} (data:, a local path, or http(s))")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
    if scheme == "" and is_bare_base64(url) and not _names_a_file(url, policy.root):
        raise APIError(400, f"{where}: {BARE_BASE64}")
    if policy.root is None:
        raise APIError(400, f"{where}: local paths are refused by this server (it has no --media-root)")
    try:  # the file system's own refusals (a name too long, a symlink loop, no permission) are the request's fault
        resolved = _under_root(path, policy.root, where)
        with open(resolved, "rb") as f:
            data = f.read(policy.max_bytes + 1)  # no more: a video dataset's root holds GB files
        if len(data) > policy.max_bytes:
            raise APIError(400, f"{where}: {_shown(path)} is larger than the server's {policy.max_bytes} bytes")
    except OSError as e:
        raise APIError(400, f"{where}: cannot read {_shown(path)}: {e.strerror or type(e).__name__}") from None
    except ValueError as e:  # a NUL character
        raise APIError(400, f"{where}: cannot read {_shown(path)}: {e}") from None
    except RuntimeError:  # Path.resolve's symlink loop (its message names the root: not for the client)
        raise APIError(400, f"{where}: cannot read {_shown(path)}: a symlink loop") from None
    return data, video or resolved.suffix.lower() in VIDEO_EXTENSIONS, f"{where} ({resolved.name})"


def _under_root(path: str, root: Path, where: str) -> Path:
    base = root.resolve()
    resolved = (base / path).resolve()  # an absolute `path` replaces the base; `..` and symlinks are resolved
    if resolved != base and base not in resolved.parents:
        raise APIError(400, f"{where}: the path {_shown(path)} is outside the server's media root")
    if not resolved.is_file():
        raise APIError(400, f"{where}: no file {_shown(path)} under the media root")
    return resolved


def _names_a_file(path: str, root: Optional[Path]) -> bool:
    """Whether `path` names a file under the media root (none without a root); any refusal of it is a no."""
    if root is None:
        return False
    try:
        _under_root(path, root, "")
        return True
    except (APIError, OSError, ValueError, RuntimeError):
        return False


def _shown(text: str, limit: int = 200) -> str:
    """A path or URL quoted for an error message, cut to `limit` characters (a request may send thousands)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: the IPv4 address in the low 32 bits
# RFC 8215's local-use NAT64 prefix: where the IPv4 address sits in it is the network's choice (RFC 6052's /48 to
# /96 layouts), so no address in it is taken for public.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def public_address(address: str) -> bool:
    """Whether a connection's peer address is a global one; an IPv6 address that embeds an IPv4 address is judged by
    the IPv4 address, which it reaches (`embedded_ipv4`)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        ip = embedded_ipv4(ip) or ip
    return ip.is_global


def embedded_ipv4(ip: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address stands for, or None: IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated
    `::ffff:0:a.b.c.d` (RFC 2765), IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` (a NAT64 gateway connects to
    that IPv4 address) and 6to4 `2002:aabb:ccdd::/48`."""
    value = int(ip)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if value >> 32 in (0, 0xFFFF_0000) or ip in _NAT64:  # IPv4-compatible (:: and ::1 too), -translated, NAT64
        return ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    return ip.sixtofour


class _Deadline:
    """One fetch's time limit, over the whole download: connecting (each redirect hop), the TLS handshake, the
    headers and the body. A socket timeout bounds each read only, so a host sending a byte every few seconds would
    hold the fetch (and the worker thread running it) as long as it likes; at the deadline every connection of the
    fetch is shut down instead, which ends a blocked read at once. Each host name is resolved within it too
    (`_resolve`): a resolver that never answers would otherwise hold the fetch for the system's own timeouts."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.passed = False
        self._end = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []  # duplicates of the connections' sockets: ours to shut and close
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def over(self) -> bool:
        return self.passed or time.monotonic() >= self._end

    def connect(self, address: tuple[str, int], timeout: Optional[float], *args: object) -> socket.socket:
        """`socket.create_connection` within the time left; the connection is shut at the deadline (its reads keep
        `timeout`, so the deadline cuts them first). A duplicate of the socket is kept (shutting it down shuts the
        connection), since TLS moves the original's descriptor to a new socket object."""
        host, port = address
        failed: Optional[OSError] = None
        for *_, peer in _resolve(host, port, self._end - time.monotonic()):  # each address, as create_connection
            left = self._end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no time left of {self.seconds:g} s")
            try:
                sock = socket.create_connection(peer[:2], left if timeout is None else min(timeout, left), *args)
            except OSError as e:
                failed = e
                continue
            sock.settimeout(timeout)
            with self._lock:
                self._sockets.append(sock.dup())
                if self.passed:
                    _shut(self._sockets[-1])
            return sock
        raise failed or OSError(f"no address to connect to for {host}")

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            for sock in self._sockets:
                _shut(sock)


def _resolve(host: str, port: int, seconds: float) -> list[tuple]:
    """`socket.getaddrinfo` of a TCP connection to (host, port), waited for at most `seconds` (TimeoutError past
    them). It runs in a daemon thread, since a lookup cannot be interrupted: one that hangs ends on its own, with the
    system resolver's timeouts, and no request waits for it."""
    if seconds <= 0:
        raise TimeoutError("no time left to resolve the host")
    found: list[tuple] = []
    failed: list[Exception] = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except Exception as e:  # (gaierror, UnicodeError of a bad name) raised in the caller
            failed.append(e)

    worker = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"{host} was not resolved within {seconds:.3g} s")
    if failed:
        raise failed[0]
    if not found:
        raise OSError(f"getaddrinfo returned no address for {host}")
    return found


def _shut(sock: socket.socket) -> None:
    """Shut a connection down both ways: a read blocked on it returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer
        pass


def _checked(connection: type, policy: MediaPolicy, deadline: _Deadline) -> type:
    """`connection` (http.client's HTTP or HTTPS connection) connecting within `deadline`, and refusing, once
    connected and before any request is sent, a peer whose address is not public (unless the policy allows private
    hosts)."""

    class Checked(connection):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            self._create_connection = deadline.connect
            super().connect()
            peer = self.sock.getpeername()[0]
            if not policy.allow_private and not public_address(peer):
                self.close()
                raise ConnectionRefusedError(f"{self.host} is at {peer}, not a public address "
                                             "(--allow-private-media-hosts)")

    return Checked


def _opener(policy: MediaPolicy, deadline: _Deadline) -> urllib.request.OpenerDirector:
    """http(s) only (redirects to other schemes fail), every connection checked by `_checked`."""
    http_connection, https_connection = _checked(http.client.HTTPConnection, policy, deadline), \
        _checked(http.client.HTTPSConnection, policy, deadline)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(http_connection, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(https_connection, req, context=self._context)

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), HTTP(), HTTPS(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _fetch(url: str, policy: MediaPolicy, video: bool, where: str) -> tuple[bytes, bool, str]:
    """A remote medium's bytes, downloaded within the policy's timeout and size limit. Whatever the host answers
    (no HTTP, a broken body, an error status), and a URL that does not parse, is a 400 naming the medium."""
    deadline = _Deadline(policy.remote_timeout)
    try:
        with deadline, _opener(policy, deadline).open(url, timeout=policy.remote_timeout) as response:  # opt-in
            data = response.read(policy.max_bytes + 1)
            mime = (response.headers.get_content_type() or "").lower()
    except (OSError, http.client.HTTPException, ValueError) as e:
        if not deadline.over():
            raise APIError(400, f"{where}: cannot fetch {_shown(url)}: {_why(e)}") from None
    if deadline.over():  # (a body without a length just ends where its connection was shut)
        raise APIError(400, f"{where}: {_shown(url)} did not download within the server's "
                            f"{policy.remote_timeout:g} s")
    if len(data) > policy.max_bytes:
        raise APIError(400, f"{where}: {_shown(url)} is larger than {policy.max_bytes} bytes")
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    return data, video or mime.startswith("video/") or suffix in VIDEO_EXTENSIONS, f"{where} ({url})"


def _why(e: Exception) -> str:
    """A failed fetch's reason, short: http.client's errors by name too (`BadStatusLine: HELLO`)."""
    why, name = str(e).strip(), type(e).__name__
    if isinstance(e, http.client.HTTPException) and not why.startswith(name) or not why:
        why = f"{name}: {why}" if why else name
    return why if len(why) <= 300 else why[:300] + "..."


def _decode_video(data: bytes, policy: MediaPolicy, name: str, fps: float, max_frames: int,
                  not_an_image: bool = False) -> list[Image.Image]:
    """A video file's bytes -> its frames, its header checked first (`_check_video`), every decoded frame's size too.
    not_an_image: no image reader knew the file either; a file that is no video is then answered as neither."""
    _check_video(data, policy.max_pixels, name, not_an_image)
    return decode_video(data, fps=fps, max_frames=max_frames, max_seconds=policy.max_video_seconds,
                        max_pixels=policy.max_pixels)


def _decode_image(data: bytes, policy: MediaPolicy, name: str, fps: float, max_frames: int) -> Frames:
    """An image file's bytes -> its image, or an animation's frames (`image_frames`); a file no image reader knows,
    the frames of the video it may be (`_decode_video`)."""
    try:
        with open_image(io.BytesIO(data)) as im:  # raster readers only (EPS runs gs); Pillow's warning silenced
            width, height = im.size  # from the header: nothing decoded yet
            if width * height > policy.max_pixels:
                raise APIError(400, f"{name}: {width}x{height} is more than the server's {policy.max_pixels} "
                                    "pixels per image")
            frames = image_frames(im, fps, max_frames, policy.max_video_seconds, policy.max_pixels)
            return frames[0] if len(frames) == 1 else frames
    except APIError:
        raise
    except TooLong as e:  # (before TooManyPixels: an animation of too many frames x canvas is both)
        raise APIError(400, f"{name}: an animation {e}") from None
    except TooManyPixels as e:  # a later page of a multi-page TIFF, by its header
        raise APIError(400, f"{name}: frame {e.frame} is {e.width}x{e.height}, more than the server's "
                            f"{policy.max_pixels} pixels per image") from None
    except Image.DecompressionBombError as e:  # over twice Pillow's MAX_IMAGE_PIXELS, refused on opening
        raise APIError(400, f"{name}: refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:  # no image reader knows the file: a video under another name (.ts, .mts, none)?
        pass
    except Exception as e:  # PIL raises many types for a file it knows but cannot read (truncated, corrupt)
        raise APIError(400, f"{name}: not a decodable image ({type(e).__name__}: {_plain(e)})") from None
    return _decode_video(data, policy, name, fps, max_frames, not_an_image=True)


def _unreadable(data: bytes) -> str:
    """Why no image reader knows `data`, for its error: formats people send that have no reader here are named."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<?xml") and b"<svg" in head or head.startswith(b"<svg"):
        return "SVG is a vector drawing, not read here: send it rendered as PNG or JPEG"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIC/HEIF needs a decoder this server does not have: send the photo as JPEG or PNG"
    return f"it reads {IMAGE_FORMAT_NAMES} images and {VIDEO_CONTAINER_NAMES} videos"


def _plain(e: Exception) -> str:
    """An exception's message without Python object reprs (`<_io.BytesIO object at 0x...>`)."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", str(e)) or type(e).__name__


def _check_video(data: bytes, max_pixels: int, name: str, not_an_image: bool = False) -> None:
    """A video's header: a video stream whose frames are at most `max_pixels`, before any frame is decoded.
    not_an_image: no image reader knew the file either: one that is no video (or a server without PyAV) is
    answered as neither, its message naming what this server reads (`_unreadable`)."""
    neither = APIError(400, f"{name}: not an image or video this server can decode ({_unreadable(data)})")
    try:
        import av  # the video extra; imported when a video comes
    except ImportError:
        if not_an_image:
            raise neither from None
        raise
    try:
        with open_container(av, io.BytesIO(data), "<in-memory video>", max_pixels) as container:
            if not container.streams.video:
                raise APIError(400, f"{name}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
    except Exception as e:
        if not_an_image:
            raise neither from None
        if isinstance(e, APIError):
            raise
        if isinstance(e, UnlistedContainer):  # (concat, SDP, HLS: they would open what the file names)
            raise APIError(400, f"{name}: not a video this server can decode (it reads {VIDEO_CONTAINER_NAMES} "
                                "videos)") from None
        raise APIError(400, f"{name}: not a video this server can decode ({type(e).__name__}: {_plain(e)})") from None
    if width * height > max_pixels:
        raise APIError(400, f"{name}: {width}x{height} frames are more than the server's {max_pixels} pixels")
    if not (width and height):  # the size `open_container`'s cap left unread
        raise APIError(400, f"{name}: its frames are more than the server's {max_pixels} pixels, or of a size it "
                            "does not give")
