"""Animated images (GIF, APNG, animated WebP) are videos: the frame shown at each instant by the frames' own delays,
the same frames whichever way the file comes (a path, an opened PIL image, a data URL as image or video, a
training record)."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo import FlamingoProcessor
from flamingo.processing import add_flamingo_tokens, image_frames
from flamingo.tiny import tiny_image_processor, tiny_tokenizer
from flamingo.video import TooLong, animation_timeline, decode_video

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
FORMATS = ["GIF", "PNG", "WEBP"]


@pytest.fixture
def processor():
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    return FlamingoProcessor(tok, tiny_image_processor("clip"), max_length=64, max_frames=8)


def animation(fmt: str, delays_ms, size=(40, 32)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in COLOURS[: len(delays_ms)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=list(delays_ms), loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def colours(frames) -> list[int]:
    """Which of COLOURS each frame shows."""
    return [COLOURS.index(tuple(int(v) for v in np.asarray(f)[0, 0])) for f in frames]


def test_an_animated_avif_plays_by_its_frames_delays():
    """Pillow's AVIF reader, as its WebP reader, sets a frame's duration only when it decodes the frame: read on
    seeking alone, every frame would last the default 0.1 s (at 1 FPS, one frame of four)."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    data = animation("AVIF", [1000] * 4)
    with Image.open(io.BytesIO(data)) as opened:
        frames = image_frames(opened, fps=1.0)
    nearest = [int(np.argmin([np.abs(np.asarray(f)[0, 0].astype(int) - c).sum() for c in COLOURS])) for f in frames]
    assert nearest == [0, 1, 2, 3]


def test_the_timeline_shows_the_frame_on_screen_at_each_instant_until_the_last_delay_ends():
    # frames start at 0, 0.5, 1.2, 1.5, 2.5 and the last ends at 4.5: instants 0..4
    assert animation_timeline([0.5, 0.7, 0.3, 1.0, 2.0], fps=1.0) == [0, 1, 3, 4, 4]
    # 9 instants at 2 FPS; 3 kept, uniformly: t = 0.5, 2.0, 3.5
    assert animation_timeline([0.5, 0.7, 0.3, 1.0, 2.0], fps=2.0, max_frames=3) == [1, 3, 4]
    # a delay under 20 ms (or none) lasts 100 ms, as players show it: five frames are half a second
    assert animation_timeline([0.0, 0.01, None, 0.0, 0.0], fps=10.0) == [0, 1, 2, 3, 4]
    assert animation_timeline([0.0] * 5, fps=1.0) == [0]
    assert animation_timeline([0.1, 0.1, 5.0], fps=1.0) == [0, 2, 2, 2, 2, 2]  # a held last frame repeats


def test_a_long_animation_is_refused_before_its_remaining_frames_are_read():
    read = []

    def delays():
        for k in range(1000):
            read.append(k)
            yield 1.0

    with pytest.raises(TooLong, match="longer than the 10 s allowed"):
        animation_timeline(delays(), max_seconds=10)
    assert len(read) == 11
    with pytest.raises(ValueError, match="no frames"):
        animation_timeline([])


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_animation_reads_as_the_same_frames_from_a_path_an_opened_image_and_a_record(processor, tmp_path, fmt):
    from flamingo.data.sources import decode_frames

    data = animation(fmt, [500, 700, 300, 1000, 2000])
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(data)
    assert colours(processor.load_media(str(path))) == [0, 1, 3, 4, 4]
    expected = processor("<image>x", images=[str(path)])
    assert expected["num_frames"].tolist() == [[5]]
    with Image.open(path) as opened:
        opened.seek(2)
        assert torch.equal(processor("<image>x", images=[opened])["images"], expected["images"])
        assert opened.tell() == 2  # the caller's image is left on its frame
    assert colours(decode_frames(data, "clip")) == [0, 1, 3, 4, 4]
    still = io.BytesIO()
    Image.new("RGB", (40, 32), COLOURS[2]).save(still, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert colours(decode_frames(still.getvalue(), "still")) == [2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_server_reads_an_animation_as_the_processor_does_as_an_image_or_a_video(processor, fmt):
    pytest.importorskip("fastapi")  # the server's extra
    from flamingo.serve.media import MediaPolicy, load_medium
    from flamingo.serve.protocol import APIError

    data = animation(fmt, [500, 700, 300, 1000, 2000])
    expected = processor.preprocess_media(Image.open(io.BytesIO(data)))
    for mime in (f"image/{fmt.lower()}", f"video/{fmt.lower()}"):
        url = f"data:{mime};base64," + base64.b64encode(data).decode()
        served = load_medium(url, MediaPolicy(), fps=processor.video_fps, max_frames=processor.max_frames)
        assert colours(served) == [0, 1, 3, 4, 4], mime
        assert torch.equal(processor.preprocess_media(served), expected), mime
    with pytest.raises(APIError, match="an animation longer than the 4 s allowed"):
        load_medium(url, MediaPolicy(max_video_seconds=4), fps=1.0, max_frames=8)


def test_a_regular_gif_gives_the_frames_pyav_decodes(tmp_path):
    """At a constant delay the animation's clock and PyAV's timestamps agree frame for frame."""
    pytest.importorskip("av")
    data = animation("GIF", [1000] * 5)
    with Image.open(io.BytesIO(data)) as opened:
        frames = image_frames(opened, fps=1.0, max_frames=8)
    decoded = decode_video(data, fps=1.0, max_frames=8)
    assert colours(frames) == colours(decoded) == [0, 1, 2, 3, 4]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, decoded, strict=True))


def test_a_one_frame_gif_is_a_still(processor):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), COLOURS[1]).save(buffer, format="GIF")
    with Image.open(buffer) as opened:
        assert colours(image_frames(opened)) == [1]


def test_an_apng_s_default_image_outside_its_animation_is_not_played():
    """A PNG whose IDAT image is a still for viewers without APNG (`default_image`): browsers and FFmpeg play only
    the animation's frames, PIL reads the still as frame 0."""
    frames = [Image.new("RGB", (40, 32), c) for c in COLOURS[:4]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=1000, default_image=True)
    with Image.open(buffer) as opened:
        assert opened.info["default_image"] and opened.n_frames == 4
        assert colours(image_frames(opened, fps=1.0)) == [1, 2, 3]
        assert colours(image_frames(opened, fps=2.0, max_frames=2)) == [1, 3]  # t = 0.5 s and 2 s
        assert opened.tell() == 0


def _pages(sizes, fmt="TIFF") -> bytes:
    """A multi-page TIFF with a page of each (W, H) in `sizes`, page k red level k."""
    pages = [Image.new("RGB", size, (k, 0, 0)) for k, size in enumerate(sizes)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format=fmt, save_all=True, append_images=pages[1:])
    return buffer.getvalue()


def test_a_multi_page_tiff_plays_its_pages_and_decodes_only_those_it_shows(monkeypatch):
    """PIL reads a multi-page TIFF as animated: its pages are frames of 0.1 s (they carry no delay). Their delays
    come with their headers: reading them decodes no page."""
    from PIL import TiffImagePlugin

    decoded = set()
    load = TiffImagePlugin.TiffImageFile.load

    def counting(self):
        decoded.add(self.tell())
        return load(self)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", counting)
    with Image.open(io.BytesIO(_pages([(16, 16)] * 30))) as opened:
        frames = image_frames(opened, fps=1.0)
    assert [int(np.asarray(f)[0, 0, 0]) for f in frames] == [0, 10, 20]
    assert decoded == {0, 10, 20}


def test_the_server_checks_every_page_s_size_against_its_pixel_limit_before_decoding_it():
    """A TIFF's pages each have their own size: a small first page must not let a later one of any size through (a
    174 KB TIFF holds a 6000x6000 page), sampled or not. (An MPO is its first image only: tests/test_data_mpo.py.)"""
    pytest.importorskip("fastapi")  # the server's extra
    from flamingo.serve.media import MediaPolicy, load_medium
    from flamingo.serve.protocol import APIError

    policy = MediaPolicy(max_pixels=10_000)
    small = "data:image/tiff;base64," + base64.b64encode(_pages([(32, 24)] * 3)).decode()
    assert [f.size for f in load_medium(small, policy, fps=10.0)] == [(32, 24)] * 3
    big = _pages([(32, 24)] * 2 + [(200, 100)])
    url = "data:image/tiff;base64," + base64.b64encode(big).decode()
    with pytest.raises(APIError, match=r"frame 2 is 200x100, more than the server's 10000 pixels per image") as e:
        load_medium(url, policy)  # at 1 FPS only page 0 is shown
    assert e.value.status == 400
