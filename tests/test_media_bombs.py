"""Small files of huge frames are refused by their size before the frames are decoded: a video's first frames, which
FFmpeg decodes on opening it, under the reader's pixel cap; an animation's many frames on a large canvas (GIF, APNG,
animated WebP) by its frame count; in training data and the processor's local files, under
`processing.default_max_pixels` (a training record whose medium is over it skipped and counted)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from flamingo.video import decode_video

av = pytest.importorskip("av")


def _video(width: int, height: int, codec: str = "mpeg4", fmt: str = "mp4", frames: int = 1, rate: int = 1,
           shade: int = 0) -> bytes:
    """`frames` frames of width x height at `rate` frames per second, frame k grey at k * shade (all black)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "51"}
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), k * shade, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


_PEAK = textwrap.dedent("""
    import re, sys
    import av
    from flamingo.video import decode_video

    def kib(field):
        return int(re.search(field + r":\\s*(\\d+)", open("/proc/self/status").read()).group(1))

    data = sys.stdin.buffer.read()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size (VmHWM) starts again from the current one
    before = kib("VmRSS")
    try:
        decode_video(data, max_pixels=20_000_000)
    except ValueError as e:
        print(e)
    print((kib("VmHWM") - before) // 1024)
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the peak resident size is reset by /proc")
def test_a_video_of_frames_over_the_cap_is_refused_without_decoding_one():
    """A 200 KB MP4 of one 8192x8192 H.264 frame: opening it decoded the frame (+170 MiB; 16000x16000: +600 MiB)
    before its size was checked. The decoders opening it are capped: it is refused by its size, at little cost."""
    data = _video(8192, 8192, "libx264")
    run = subprocess.run([sys.executable, "-c", _PEAK], input=data, capture_output=True, timeout=120, check=True)
    message, grown = run.stdout.decode().splitlines()
    assert "8192x8192 frames are more than the 20000000 pixels allowed" in message
    assert int(grown) < 64, f"{grown} MiB to refuse it"


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the peak resident size is reset by /proc")
@pytest.mark.parametrize("fmt", ["flv", "mpeg"])
def test_an_flv_or_mpeg_ps_video_of_frames_over_the_cap_is_refused_without_decoding_one(fmt):
    """FLV and MPEG-PS streams appear while FFmpeg probes the file, and PyAV gives the decoders' cap only to the
    streams a header declares: opening a 8192x8192 H.264 FLV or MPEG-PS decoded its frame uncapped (+160 MiB). They
    are probed with no decoder first, and refused by the size their parser reads (FLV) or their frames', decoded
    under a cap (a one-frame MPEG-PS: its parser reads none)."""
    data = _video(8192, 8192, "libx264", fmt)
    run = subprocess.run([sys.executable, "-c", _PEAK], input=data, capture_output=True, timeout=120, check=True)
    message, grown = run.stdout.decode().splitlines()
    assert "frames are more than the 20000000 pixels allowed" in message
    assert int(grown) < 64, f"{grown} MiB to refuse it"


def _growing_video(fmt: str, sizes: list[int]) -> bytes:
    """An H.264 stream whose frames (two of each side in `sizes`, each size from its own encoder, its own SPS in the
    stream) grow after its first."""
    from fractions import Fraction

    buffer, pts = io.BytesIO(), 0
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width = stream.height = sizes[0]
        stream.pix_fmt = "yuv420p"
        for i, side in enumerate(sizes):
            encoder = stream.codec_context if i == 0 else av.CodecContext.create("libx264", "w")
            encoder.options = {"preset": "ultrafast", "crf": "51"}
            if i:
                encoder.width = encoder.height = side
                encoder.pix_fmt, encoder.time_base, encoder.framerate = "yuv420p", Fraction(1, 1), 1
            packets = []
            for _ in range(2):
                frame = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
                frame.pts, frame.time_base, pts = pts, Fraction(1, 1), pts + 1
                packets += encoder.encode(frame)
            for packet in packets + list(encoder.encode()):
                packet.stream, packet.time_base = stream, Fraction(1, 1)
                container.mux(packet)
    return buffer.getvalue()


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the peak resident size is reset by /proc")
def test_an_mpeg_ps_video_growing_past_the_cap_while_probed_is_refused_without_decoding_it():
    """Probing decodes the frames of an MPEG-PS's first packets, not only its first: 64x64 frames then 8192x8192
    ones (a new SPS) took +160 MiB there, uncapped. They are decoded under a cap first, and refused so."""
    data = _growing_video("mpeg", [64, 8192])
    run = subprocess.run([sys.executable, "-c", _PEAK], input=data, capture_output=True, timeout=120, check=True)
    message, grown = run.stdout.decode().splitlines()
    assert "frames are more than the 20000000 pixels allowed" in message
    assert int(grown) < 64, f"{grown} MiB to refuse it"


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the peak resident size is reset by /proc")
@pytest.mark.parametrize(("fmt", "first"), [("mpegts", 4), ("matroska", 4), ("mp4", 4), ("flv", 2), ("mpeg", 12)])
def test_a_video_growing_past_the_frames_opening_decodes_is_refused_by_its_decoder(fmt, first):
    """Opening a video decodes only its first frames (FFmpeg's probing: 7 of an H.264 stream), and `av.open`'s cap
    reaches only the decoders probing opens: MPEG-TS, Matroska and MP4 frames growing from 64x64 to 8192x8192 after
    the eighth were decoded uncapped (+159 MiB) before their size was checked. The decoders that read the frames are
    capped too: refused there (FLV's and MPEG-PS's frames past those they are probed for, or growing where FFmpeg's
    probing decodes them, as well)."""
    data = _growing_video(fmt, [64] * first + [8192])
    run = subprocess.run([sys.executable, "-c", _PEAK], input=data, capture_output=True, timeout=120, check=True)
    message, grown = run.stdout.decode().splitlines()
    assert "more than the 20000000 pixels allowed" in message
    assert int(grown) < 64, f"{grown} MiB to refuse it"


@pytest.mark.parametrize("fmt", ["flv", "mpeg"])
def test_an_flv_or_mpeg_ps_stream_its_probe_stops_is_returned_with_its_decoder_unopened(fmt):
    """An FLV or MPEG-PS whose probed frames grow past the cap (64x64, then 8192x8192: the decoder's cap stops it) is
    returned reopened: its size unread (0x0, which its callers refuse) and its decoder unopened; not as probed, its
    decoder open mid-stream at whatever size it was left (under the cap where bad data stopped it)."""
    from flamingo.video import open_container

    with open_container(av, io.BytesIO(_growing_video(fmt, [64, 8192])), "grown", 20_000_000) as container:
        context = container.streams.video[0].codec_context
        assert (context.width, context.height, context.is_open) == (0, 0, False)
    with pytest.raises(ValueError, match="its frames are more than the 20000000 pixels allowed, or of a size"):
        decode_video(_growing_video(fmt, [64, 8192]), max_pixels=20_000_000)


@pytest.mark.parametrize(("fmt", "codec", "width", "height"), [
    ("flv", "flv", 8000, 40), ("flv", "flv", 64, 64), ("mp4", "mpeg4", 8000, 40), ("mp4", "libx264", 40, 8000),
    ("mpeg", "mpeg2video", 962, 540), ("webm", "libvpx", 8000, 40), ("matroska", "libvpx-vp9", 40, 8000)])
def test_thin_and_unaligned_frames_at_the_cap_decode_as_uncapped(fmt, codec, width, height):
    """Decoders hold their cap to their padded buffers, not to the frame: a Sorenson H.263 (FLV1) or MPEG-4 part 2
    frame of 8000x40 needs 2.28 M pixels there (64x64: 53,760), an H.264 one of 40x8000 512 k. The cap given them
    has room for that (`decoder_cap`): frames of the cap, or within 1 M, decode as uncapped."""
    data = _video(width, height, codec, fmt, frames=3, rate=25, shade=40)
    frames = [np.asarray(f).tolist() for f in decode_video(data, fps=25)]
    assert len(frames) == 3
    for cap in (width * height, 1_000_000):
        assert [np.asarray(f).tolist() for f in decode_video(data, fps=25, max_pixels=cap)] == frames


@pytest.mark.parametrize(("fmt", "codec"), [("flv", "flv"), ("flv", "libx264"), ("mpeg", "mpeg2video"),
                                            ("mpeg", "libx264")])
def test_flv_and_mpeg_ps_videos_under_the_cap_decode_as_uncapped(fmt, codec):
    """A capped reader gives an FLV's or MPEG-PS's frames as an uncapped one does (their first frames decoded under
    the cap before: FLV's Sorenson H.263 has no parser to give their size); one pixel under them, refused."""
    data = _video(64, 64, codec, fmt, frames=12, rate=25, shade=20)
    frames = decode_video(data, fps=25, max_frames=4)
    assert [np.asarray(f).tolist() for f in decode_video(data, fps=25, max_frames=4, max_pixels=4096)] == [
        np.asarray(f).tolist() for f in frames]
    assert len(frames) == 4
    with pytest.raises(ValueError, match="frames are more than the 4095 pixels allowed"):
        decode_video(data, max_pixels=4095)


def test_a_frame_size_the_capped_decoder_leaves_unread_is_refused_and_one_at_the_cap_decodes():
    """Most decoders (MPEG-4 part 2 here) leave a size over their cap (`decoder_cap`: the cap with room for their
    padding) unread (0x0): the video is refused so, by the server too; one over the cap within the room by its size;
    one whose frames are exactly the cap decodes."""
    pytest.importorskip("fastapi")  # the server's extra
    from flamingo.serve.media import MediaPolicy, load_medium
    from flamingo.serve.protocol import APIError

    data, over = _video(64, 64, frames=2), _video(640, 640, frames=2)
    with pytest.raises(ValueError, match="frames are more than the 4095 pixels allowed, or of a size it does not"):
        decode_video(over, max_pixels=4095)
    with pytest.raises(ValueError, match="64x64 frames are more than the 4095 pixels allowed"):
        decode_video(data, max_pixels=4095)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    for video, detail in ((over, "its frames are more than the server's 4095 pixels"),
                          (data, "64x64 frames are more than the server's 4095 pixels")):
        with pytest.raises(APIError, match=detail) as refused:
            load_medium("data:video/mp4;base64," + base64.b64encode(video).decode(), MediaPolicy(max_pixels=4095),
                        video=True)
        assert refused.value.status == 400
    assert [f.size for f in decode_video(data, max_pixels=4096)] == [(64, 64)] * 2
    assert len(load_medium(url, MediaPolicy(max_pixels=4096), video=True)) == 2


def _animation(fmt: str, count: int, size: int = 100) -> bytes:
    """`count` frames of size x size shown 20 ms each, alternately black and white."""
    frames = [Image.new("RGB", (size, size), (k % 2 * 255,) * 3) for k in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=20, loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_apng_or_webp_of_more_frames_than_the_pixel_budget_is_refused_before_a_frame_is_decoded(fmt, monkeypatch):
    """As a GIF's, an APNG's and an animated WebP's frames are decoded whole (the canvas) to read their delays: frames
    x canvas is bounded (`ANIMATION_PIXELS` images of the reader's cap) by the frame count their header gives."""
    from PIL import ImageFile, WebPImagePlugin

    from flamingo.processing import ANIMATION_PIXELS, image_frames
    from flamingo.video import TooLong

    cap = 100 * 100
    with Image.open(io.BytesIO(_animation(fmt, ANIMATION_PIXELS))) as im:
        assert len(image_frames(im, max_pixels=cap)) == 2  # 64 frames of 20 ms: 1.28 s
    decoded = []
    for reader in (ImageFile.ImageFile, WebPImagePlugin.WebPImageFile):
        monkeypatch.setattr(reader, "load", lambda self, load=reader.load: decoded.append(self.tell()) or load(self))
    with Image.open(io.BytesIO(_animation(fmt, ANIMATION_PIXELS + 1))) as im:
        assert im.format == fmt and im.n_frames == ANIMATION_PIXELS + 1
        with pytest.raises(TooLong, match=f"of {ANIMATION_PIXELS + 1} frames of 100x100 is more than"):
            image_frames(im, max_pixels=cap)
    assert decoded == []


def test_the_processors_local_files_over_the_cap_are_refused_and_at_it_read(tmp_path, monkeypatch):
    """Chat's and evaluation's local files (`FlamingoProcessor.load_media`) are read under `default_max_pixels`, as
    training's: a video (by its extension or by what it holds) of frames over it, an image over it (Pillow only warns
    below twice it) and an animation of more frames x canvas than `ANIMATION_PIXELS` such images are refused, each
    with a ValueError naming its file and the knob (`PIL.Image.MAX_IMAGE_PIXELS`); media at the cap are read."""
    from flamingo import FlamingoProcessor
    from flamingo.processing import ANIMATION_PIXELS, add_flamingo_tokens
    from flamingo.tiny import tiny_image_processor, tiny_tokenizer

    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    processor = FlamingoProcessor(tok, tiny_image_processor("clip"), max_length=64, max_frames=4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    for name, size in (("at_cap.png", 64), ("over_cap.png", 80)):
        Image.new("RGB", (size, size), "red").save(tmp_path / name)
    (tmp_path / "many_frames.gif").write_bytes(_animation("GIF", ANIMATION_PIXELS + 1, 64))
    for name, size in (("at_cap.mp4", 64), ("over_cap.mp4", 80), ("at_cap.ts", 64), ("over_cap.ts", 80)):
        (tmp_path / name).write_bytes(_video(size, size, fmt="mpegts" if name.endswith(".ts") else "mp4"))

    assert [f.size for f in processor.load_media(tmp_path / "at_cap.png")] == [(64, 64)]
    assert [f.size for f in processor.load_media(tmp_path / "at_cap.mp4")] == [(64, 64)]
    assert [f.size for f in processor.load_media(tmp_path / "at_cap.ts")] == [(64, 64)]
    for name, detail in (("over_cap.png", "80x80 is more than the 4096 pixels allowed"),
                         ("over_cap.mp4", "frames are more than the 4096 pixels allowed"),
                         ("over_cap.ts", "frames are more than the 4096 pixels allowed"),
                         ("many_frames.gif", f"of {ANIMATION_PIXELS + 1} frames of 64x64 is more than")):
        with pytest.raises(ValueError, match=detail) as refused:
            processor.load_media(tmp_path / name)
        assert name in str(refused.value) and "PIL.Image.MAX_IMAGE_PIXELS" in str(refused.value)


def test_training_media_over_the_loaders_cap_are_skipped_and_counted_before_they_are_decoded(tmp_path, monkeypatch):
    """The loaders read images and videos under `default_max_pixels` (Pillow's `MAX_IMAGE_PIXELS`), as the server
    under its `--max-image-pixels`: an image over it (Pillow only warns below twice it), a video's frames over it
    and an animation of more frames x canvas than `ANIMATION_PIXELS` such images are `bad_image` / `bad_video`,
    and no image is decoded for it; media at the cap are read."""
    from PIL import ImageFile

    from flamingo.data.errors import SkipSample
    from flamingo.data.fixtures import write_jsonl
    from flamingo.data.inspect import inspect_dataset
    from flamingo.data.sources import decode_frames, file_ref
    from flamingo.processing import ANIMATION_PIXELS

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    for name, size in (("at_cap.png", 64), ("over_cap.png", 80)):
        Image.new("RGB", (size, size), "red").save(tmp_path / name)
    (tmp_path / "frames.gif").write_bytes(_animation("GIF", 3, 64))
    (tmp_path / "many_frames.gif").write_bytes(_animation("GIF", ANIMATION_PIXELS + 1, 64))
    (tmp_path / "at_cap.mp4").write_bytes(_video(64, 64))
    (tmp_path / "over_cap.mp4").write_bytes(_video(80, 80))

    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, load=ImageFile.ImageFile.load:
                        decoded.append(self.tell()) or load(self))
    for name, detail in (("over_cap.png", "80x80 is more than the 4096 pixels allowed"),
                         ("many_frames.gif", f"an animation of {ANIMATION_PIXELS + 1} frames of 64x64 is more than")):
        with pytest.raises(SkipSample, match=detail) as skipped:
            decode_frames((tmp_path / name).read_bytes(), name)
        assert skipped.value.reason == "bad_image"
    assert decoded == []
    with pytest.raises(SkipSample, match="frames are more than the 4096 pixels allowed") as skipped:
        file_ref(str(tmp_path / "over_cap.mp4"), video=True).load()
    assert skipped.value.reason == "bad_video"

    pairs = write_jsonl(str(tmp_path / "pairs.jsonl"), [{"image": name, "caption": "a square"} for name in (
        "at_cap.png", "over_cap.png", "frames.gif", "many_frames.gif")])
    report = inspect_dataset(pairs, "pairs")
    assert (report.samples, report.skipped) == (2, {"bad_image": 2})
    videos = write_jsonl(str(tmp_path / "videos.jsonl"), [{"video": name, "caption": "a square"} for name in (
        "at_cap.mp4", "over_cap.mp4")])
    report = inspect_dataset(videos, "video")
    assert (report.samples, report.frames, report.skipped) == (1, 1, {"bad_video": 1})


def _avif(path, count: int, width: int, height: int, mode: str = "RGB") -> None:
    """An AVIF of `count` frames, frame k red at 60 k (and alpha 100 + k), shown 100, 250, 33, 700, 100, ... ms."""
    frames = [Image.new(mode, (width, height), (k * 60 % 256, 0, 0, 100 + k)) for k in range(count)]
    frames[0].save(path, format="AVIF", save_all=True, append_images=frames[1:], speed=10,
                   duration=[(100, 250, 33, 700)[k % 4] for k in range(count)])


def test_pack_reencodes_an_image_only_within_the_loaders_cap(tmp_path, monkeypatch):
    """`flamingo data pack` re-encodes as PNG an image whose format's extension the tar reader does not list (AVIF,
    PPM), by their headers first: one over `default_max_pixels` is `bad_image` (the loader refuses it; Pillow's own
    check only warns below twice it), as is an animation the loader refuses for its frames x canvas. Pillow's writer,
    which holds every frame (a 15 KB AVIF of 20 4000x4000 frames took 1.5 GiB), writes an animation of at most the
    cap's pixels in all; a larger one is encoded frame by frame (its frames at most a quarter of the cap; larger,
    or without PyAV, `reencode_size`). Either reads back as the loader reads the AVIF: frames, delays, alpha."""
    from PIL import features

    from flamingo.data.errors import SkipSample
    from flamingo.data.pack import Unpackable, _image_member
    from flamingo.processing import ANIMATION_PIXELS, image_frames

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "at_cap", format="PPM")
    Image.new("RGB", (80, 80), "red").save(tmp_path / "over_cap", format="PPM")
    assert _image_member(str(tmp_path / "at_cap"), "k")[0] == "k.png"
    with pytest.raises(SkipSample, match="80x80 is more than the 4096 pixels allowed") as skipped:
        _image_member(str(tmp_path / "over_cap"), "k")
    assert skipped.value.reason == "bad_image"
    if not features.check("avif"):
        return
    for name, count, mode in (("small", 4, "RGB"), ("large", 5, "RGB"), ("large_alpha", 9, "RGBA")):
        _avif(tmp_path / name, count, 32, 32, mode)  # 4 x 32 x 32 is the cap: Pillow's writer; more, frame by frame
        member, data = _image_member(str(tmp_path / name), "k")
        with Image.open(io.BytesIO(data)) as packed, Image.open(tmp_path / name) as source:
            assert member == "k.png" and packed.n_frames == count
            frames = [np.asarray(f).tolist() for f in image_frames(packed, fps=100, max_frames=1000)]
            assert frames == [np.asarray(f).tolist() for f in image_frames(source, fps=100, max_frames=1000)]
            shown = sum((100, 250, 33, 700)[k % 4] for k in range(count))  # ms: the last frame's delay too
            assert len(frames) == -(-shown // 10)
    _avif(tmp_path / "wide_frames", 3, 40, 40)  # 1600 pixels a frame: over a quarter of the cap
    with pytest.raises(Unpackable, match="3 frames of 40x40 is more than the 4096 pixels") as left_out:
        _image_member(str(tmp_path / "wide_frames"), "k")
    assert left_out.value.reason == "reencode_size"
    _avif(tmp_path / "many_frames", ANIMATION_PIXELS * 4 + 1, 32, 32)
    with pytest.raises(SkipSample, match=f"an animation of {ANIMATION_PIXELS * 4 + 1} frames of 32x32") as skipped:
        _image_member(str(tmp_path / "many_frames"), "k")
    assert skipped.value.reason == "bad_image"

    def no_pyav():
        raise ImportError("videos need PyAV (av): pip install 'flamingo-vlm[video]'")

    monkeypatch.setattr("flamingo.data.pack.import_av", no_pyav)
    with pytest.raises(Unpackable, match="frame by frame needs PyAV") as left_out:
        _image_member(str(tmp_path / "large"), "k")
    assert left_out.value.reason == "reencode_size"
    assert _image_member(str(tmp_path / "small"), "k")[0] == "k.png"


_PACK_PEAK = textwrap.dedent("""
    import re, sys
    from PIL import Image
    from flamingo.data.pack import _image_member

    def kib(field):
        return int(re.search(field + r":\\s*(\\d+)", open("/proc/self/status").read()).group(1))

    Image.MAX_IMAGE_PIXELS = 4_000_000
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
    member, data = _image_member(sys.argv[1], "k")
    print(member, (kib("VmHWM") - before) // 1024)
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="the peak resident size is reset by /proc")
def test_pack_reencodes_a_large_animation_holding_a_few_frames(tmp_path):
    """An AVIF of 40 1000x1000 frames (10 times a 4 M cap in all, each a quarter of it) is packed holding a few
    frames: +66 MiB (Pillow's writer, holding all 40: +193 MiB)."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("Pillow without AVIF")
    _avif(tmp_path / "anim", 40, 1000, 1000)
    run = subprocess.run([sys.executable, "-c", _PACK_PEAK, str(tmp_path / "anim")], capture_output=True, timeout=300,
                         check=True)
    member, grown = run.stdout.decode().split()
    assert member == "k.png"
    assert int(grown) < 128, f"{grown} MiB to re-encode it"


def _processor():
    from flamingo import FlamingoProcessor
    from flamingo.processing import add_flamingo_tokens
    from flamingo.tiny import tiny_image_processor, tiny_tokenizer

    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    return FlamingoProcessor(tok, tiny_image_processor("clip"), max_length=64, max_frames=4)


def test_an_image_over_the_processors_cap_shows_its_refusal_alone(tmp_path, monkeypatch, recwarn):
    """Pillow warns of an image over its `MAX_IMAGE_PIXELS` (below twice it) on opening, and refuses one over twice
    it with its own error: the processor's refusal is all a user sees, a `TooManyPixels` naming the file and the
    knob in both cases, and no DecompressionBombWarning escapes."""
    from flamingo.video import TooManyPixels

    processor = _processor()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    for name, size in (("over_cap.png", 80), ("over_twice_cap.png", 100)):
        Image.new("RGB", (size, size), "red").save(tmp_path / name)
    for name, detail in (("over_cap.png", "80x80 is more than the 4096 pixels allowed"),
                         ("over_twice_cap.png", "more than twice the 4096 pixels allowed")):
        with pytest.raises(TooManyPixels, match=detail) as refused:
            processor.load_media(tmp_path / name)
        assert name in str(refused.value) and "PIL.Image.MAX_IMAGE_PIXELS" in str(refused.value)
        assert refused.value.max_pixels == 4096
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_images_opened_on_two_threads_at_once_leave_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """Pillow's warning was silenced in a `catch_warnings` block around each opening: warnings' filters are one list
    for the process, and two threads' blocks that overlapped restored each other's, leaving the "ignore" in place for
    good. Openings now take turns while it is silenced; here thread B opens while A is inside its opening."""
    processor = _processor()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "small.png")
    opened, a_inside, b_inside = Image.open, threading.Event(), threading.Event()

    def open_slowly(*args, **kwargs):
        if threading.current_thread().name == "A":
            a_inside.set()
            b_inside.wait(1.0)  # B, if it is let in, opens now
        else:
            b_inside.set()
        return opened(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_slowly)
    before = list(warnings.filters)
    a = threading.Thread(target=processor.load_media, args=(tmp_path / "small.png",), name="A")
    b = threading.Thread(target=processor.load_media, args=(tmp_path / "small.png",), name="B")
    a.start()
    assert a_inside.wait(30)
    b.start()
    a.join()
    b.join()
    assert warnings.filters == before


def test_the_processors_refusals_by_the_cap_are_typed_with_their_size(tmp_path, monkeypatch):
    """The knob hint follows the refusal's type (`TooManyPixels`, a ValueError), not its wording: an image's, a
    video's (by its extension or by what it holds) and an animation's (a `TooLong` too) carry the size and the cap;
    other refusals get no hint."""
    from flamingo.processing import ANIMATION_PIXELS
    from flamingo.video import TooLong, TooManyPixels

    processor = _processor()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    Image.new("RGB", (80, 80), "red").save(tmp_path / "over_cap.png")
    (tmp_path / "many_frames.gif").write_bytes(_animation("GIF", ANIMATION_PIXELS + 1, 64))
    (tmp_path / "over_cap.mp4").write_bytes(_video(80, 80))
    (tmp_path / "over_cap.ts").write_bytes(_video(80, 80, fmt="mpegts"))
    for name, size in (("over_cap.png", (80, 80)), ("over_cap.mp4", (80, 80)), ("over_cap.ts", (80, 80)),
                       ("many_frames.gif", (64, 64))):
        with pytest.raises(TooManyPixels) as refused:
            processor.load_media(tmp_path / name)
        assert (refused.value.width, refused.value.height, refused.value.max_pixels) == (*size, 4096)
        assert isinstance(refused.value, TooLong) == name.endswith(".gif")
    assert f"an animation of {ANIMATION_PIXELS + 1} frames" in str(refused.value)
    Image.new("RGB", (2, 1000), "red").save(tmp_path / "thin.png")
    with pytest.raises(ValueError, match="aspect ratio") as refused:
        processor.load_media(tmp_path / "thin.png")
    assert not isinstance(refused.value, TooManyPixels) and "MAX_IMAGE_PIXELS" not in str(refused.value)


@pytest.mark.parametrize(("fmt", "first"), [("mpegts", 4), ("matroska", 4), ("mp4", 4), ("mpeg", 12)])
def test_a_frame_its_capped_decoder_refuses_is_named_by_the_size_it_read(fmt, first):
    """A stream growing past the cap after the frames opening decodes is refused by its decoder, which gives FFmpeg's
    bare 'invalid data': H.264's decoder then holds the new sequence header's size, which the refusal names."""
    from flamingo.video import TooManyPixels

    with pytest.raises(TooManyPixels, match="a 2048x2048 frame is more than the 200000 pixels allowed") as refused:
        decode_video(_growing_video(fmt, [64] * first + [2048]), max_pixels=200_000)
    assert (refused.value.width, refused.value.height) == (2048, 2048)
