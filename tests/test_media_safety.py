"""Media from clients and datasets are decoded from their own bytes, by raster image readers and the video
containers `flamingo.runtime.media_formats` lists: an FFmpeg concat script names no file it reads (nor, by its error,
which exist), an SDP "video" binds no port and is refused at once, an EPS "image" runs no Ghostscript; a file under
`--media-root` larger than the size limit is refused by its size; IPv6 addresses that embed an IPv4 address are judged
by it."""

from __future__ import annotations

import base64
import io
import os
import socket
import time

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from flamingo.data.errors import SkipSample
from flamingo.data.pack import _image_member
from flamingo.data.sources import decode_frames
from flamingo.video import decode_video

av = pytest.importorskip("av")
pytest.importorskip("fastapi")  # the server's extra
from flamingo.serve.media import MediaPolicy, load_medium, public_address  # noqa: E402
from flamingo.serve.protocol import APIError  # noqa: E402

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 32 32
%%EndComments
0 0 moveto 32 32 lineto stroke
showpage
%%EOF
"""


def _mp4(levels=(40, 120, 200)) -> bytes:
    """A 16x16 MP4 at 1 frame per second, one grey level a frame."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), level, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _png(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _refusal(url: str, policy: MediaPolicy = MediaPolicy()) -> str:
    with pytest.raises(APIError) as caught:
        load_medium(url, policy)
    assert caught.value.status == 400
    return caught.value.message


def test_a_concat_script_reads_no_file_and_tells_none_exists(tmp_path, monkeypatch):
    """An ffconcat script names files relative to the working directory; FFmpeg's concat demuxer would read them
    (the server's own files, with no --media-root) and say which do not exist. It is refused as a container not read
    here, with the same words whether the named file exists or not, as bytes, as a path and in training rows."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(_mp4())
    (tmp_path / "photo.png").write_bytes(_png())
    messages = set()
    for name in ("clip.mp4", "photo.png", "nothere.mp4", "."):
        script = f"ffconcat version 1.0\nfile {name}\n".encode()
        for mime in ("video/mp4", "image/png"):
            message = _refusal(_data_url(script, mime))
            assert "not a" in message and "decode" in message and "MP4" in message, message
            messages.add(message.replace(mime, "MIME"))
        with pytest.raises(ValueError, match="not in a container read here"):
            decode_video(script)
    assert len(messages) == 2  # as a video, and as neither an image nor a video: never by the named file
    (tmp_path / "list.ffconcat").write_bytes(b"ffconcat version 1.0\nfile clip.mp4\n")
    with pytest.raises(ValueError, match="not in a container read here"):
        decode_video(str(tmp_path / "list.ffconcat"))


def test_an_sdp_video_is_refused_at_once_and_binds_no_port():
    """An SDP description makes FFmpeg bind the UDP ports it names and wait ~20 s for RTP packets; it is refused
    before its demuxer reads it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    port -= port % 2  # RTP's port is even (RTCP's the next)
    sdp = (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           f"m=video {port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n").encode()
    start = time.monotonic()
    message = _refusal(_data_url(sdp, "video/mp4"))
    with pytest.raises(ValueError, match="not in a container read here"):
        decode_video(sdp)
    assert time.monotonic() - start < 5  # not FFmpeg's 20 s wait for packets
    assert "not a video this server can decode (it reads MP4" in message, message


def test_videos_and_animations_in_the_listed_containers_still_decode(tmp_path, monkeypatch):
    frames = load_medium(_data_url(_mp4(), "video/mp4"), MediaPolicy(), video=True, max_frames=8)
    assert np.allclose([np.asarray(f)[8, 8, 0] for f in frames], [40, 120, 200], atol=8)  # (lossy codec)
    assert len(decode_video(_mp4())) == 3
    monkeypatch.chdir(tmp_path)
    (tmp_path / "2024-01-01T10:30:00.mp4").write_bytes(_mp4())
    assert len(decode_video("2024-01-01T10:30:00.mp4")) == 3  # a relative name, not a protocol's URL
    buffer = io.BytesIO()
    gif = [Image.new("RGB", (16, 16), (level,) * 3) for level in (0, 255)]
    gif[0].save(buffer, format="GIF", save_all=True, append_images=gif[1:], duration=[1000, 1000], loop=0)
    assert len(load_medium(_data_url(buffer.getvalue(), "image/gif"), MediaPolicy())) == 2


@pytest.fixture
def eps_reader_watched(monkeypatch):
    """Every use of Pillow's EPS reader, recorded (Ghostscript "found", never run)."""
    used = []
    opened = EpsImagePlugin.EpsImageFile._open

    def watched_open(self):
        used.append("EpsImageFile._open")
        return opened(self)

    def ghostscript(*args, **kwargs):
        used.append("Ghostscript")
        raise OSError("Ghostscript would have run")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", watched_open)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    return used


def test_an_eps_image_is_refused_without_the_eps_reader(eps_reader_watched, tmp_path):
    """Pillow's EPS reader runs Ghostscript on the file's PostScript: the server, training rows and `data pack`
    read raster formats only, and say which."""
    message = _refusal(_data_url(EPS, "image/png"))
    assert "not an image or video this server can decode (it reads PNG" in message, message
    with pytest.raises(SkipSample) as caught:
        decode_frames(EPS, "drawing.eps")
    assert caught.value.reason == "bad_image"
    (tmp_path / "drawing.eps").write_bytes(EPS)
    with pytest.raises(SkipSample) as caught:
        _image_member(str(tmp_path / "drawing.eps"), "000000")
    assert caught.value.reason == "bad_image"
    from flamingo.tiny import tiny_flamingo  # the processor's local files (generate, eval)

    with pytest.raises(ValueError, match="cannot decode image .*drawing.eps"):
        tiny_flamingo()[1].load_media(tmp_path / "drawing.eps")
    assert eps_reader_watched == []


def test_a_local_file_over_the_size_limit_is_refused_by_its_size(tmp_path):
    """A file under --media-root is read only when it is at most the policy's max_bytes (--max-body-mb), as a remote
    one: a sparse file of 64 MiB is refused by its size before it is read."""
    limit = 2**20
    big = tmp_path / "big.mp4"
    with open(big, "wb") as f:
        f.truncate(64 * 2**20)
    assert os.stat(big).st_size == 64 * 2**20
    policy = MediaPolicy(root=tmp_path, max_bytes=limit)
    assert _refusal("big.mp4", policy) == f"media: 'big.mp4' is larger than the server's {limit} bytes"
    png = _png()
    (tmp_path / "small.png").write_bytes(png)
    assert load_medium("small.png", MediaPolicy(root=tmp_path, max_bytes=len(png))).size == (16, 16)


@pytest.mark.parametrize("address,public", [
    ("64:ff9b::7f00:1", False), ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::a00:1", False),  # NAT64 (RFC 6052)
    ("64:ff9b::808:808", True),
    ("64:ff9b:1::7f00:1", False), ("64:ff9b:1::808:808", False),  # local-use NAT64 (RFC 8215): its layout unknown
    ("2002:7f00:1::", False), ("2002:a9fe:a9fe::1", False), ("2002:808:808::1", True),  # 6to4
    ("::7f00:1", False), ("::a00:1", False), ("::808:808", True),  # IPv4-compatible
    ("::ffff:0:7f00:1", False), ("::ffff:0:808:808", True),  # IPv4-translated (RFC 2765)
    ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),  # IPv4-mapped
    ("::", False), ("::1", False), ("2001:4860:4860::8888", True), ("fd00::1", False),
])
def test_an_ipv6_address_embedding_an_ipv4_address_is_judged_by_it(address, public):
    assert public_address(address) is public


def _tiled_tiff(tile: int) -> bytes:
    """A 16x16 grey TIFF of one Deflate tile its header declares `tile` x `tile` (the tile all zeros, compressed)."""
    import struct
    import zlib

    comp = zlib.compress(b"\0" * (tile * tile), 9)
    tags = [(256, 4, 16), (257, 4, 16), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, len(comp))]
    tags[8] = (324, 4, 8 + 2 + 12 * len(tags) + 4)
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", t, kind, 1, v) if kind == 4 else struct.pack("<HHIHH", t, kind, 1, v, 0)
        for t, kind, v in tags) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + comp


def test_a_tile_or_an_icon_larger_than_the_image_is_refused_before_it_is_decoded():
    """A 16x16 TIFF declaring one 16384x16384 tile made the decoder allocate the tile (256 MiB; 32768: a GiB), and an
    ICO decoded its largest icon (a PNG of any size) inside Image.open, both past the pixel limit."""
    from flamingo.serve.media import MediaPolicy, _decode_image
    from flamingo.serve.protocol import APIError

    with pytest.raises(APIError, match="frame 0 is 16384x16384, more than the server's 20000000 pixels"):
        _decode_image(_tiled_tiff(16384), MediaPolicy(), "m", 1.0, 8)
    assert _decode_image(_tiled_tiff(256), MediaPolicy(), "m", 1.0, 8).size == (16, 16)  # an ordinary tile
    icon = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(icon, format="ICO")
    with pytest.raises(APIError, match="not an image or video this server can decode"):
        _decode_image(icon.getvalue(), MediaPolicy(), "m", 1.0, 8)


def test_an_animation_of_more_frames_than_the_pixel_budget_is_refused_before_its_frames_are_read():
    """Every frame of a GIF is decoded whole to read its delay: a 60 KB GIF of 2000 one-pixel frames on a 4000x4000
    canvas took 100 s. Frames x canvas is bounded (`ANIMATION_PIXELS` images of the server's limit) from the frame
    count, read without decoding."""
    from flamingo.processing import ANIMATION_PIXELS
    from flamingo.serve.media import MediaPolicy, _decode_image
    from flamingo.serve.protocol import APIError

    def gif(count: int) -> bytes:
        frames = [Image.new("RGB", (100, 100), (k % 2 * 255,) * 3) for k in range(count)]
        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=20, loop=0)
        return buffer.getvalue()

    policy = MediaPolicy(max_pixels=100 * 100)
    assert len(_decode_image(gif(ANIMATION_PIXELS), policy, "m", 1.0, 8)) == 2  # 64 frames of 20 ms: 1.28 s
    with pytest.raises(APIError, match=f"an animation of {ANIMATION_PIXELS + 1} frames of 100x100 is more than"):
        _decode_image(gif(ANIMATION_PIXELS + 1), policy, "m", 1.0, 8)
