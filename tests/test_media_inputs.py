"""Media the processor, the server and the training shards accept or refuse: image modes, sizes (a video's on every
frame), transparency (a video's too), arrays, tensors, EXIF orientation, videos under other names, and a medium given
without a list."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo import FlamingoProcessor
from flamingo.processing import MAX_ASPECT_RATIO, add_flamingo_tokens, upright_rgb
from flamingo.tiny import random_image, tiny_image_processor, tiny_tokenizer
from flamingo.video import uniform_frame_indices

from helpers import save_sideways_jpeg


@pytest.fixture
def processor():
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    return FlamingoProcessor(tok, tiny_image_processor("clip"), max_length=64, max_frames=4)


def pixels(processor, medium):
    return processor("<image>x", images=[medium])["images"][0, 0]  # (F, C, H, W)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def server_decode(data, name):
    pytest.importorskip("fastapi")  # the server's extra
    from flamingo.serve.media import MediaPolicy, _decode_image

    return _decode_image(data, MediaPolicy(max_pixels=10**8), name, 1.0, 8)


def test_16_bit_greyscale_keeps_its_contrast_at_every_entry_point(processor, tmp_path):
    """A 16-bit greyscale PNG (a depth map, a scan) reads as its high byte: dark stays dark, mid-grey mid-grey, the
    full range keeps its contrast. It was clipped to white everywhere."""
    values = np.zeros((32, 64), dtype=np.uint16)  # (H, W)
    values[:, :16] = 1000
    values[:, 16:32] = 0x8000
    values[:, 32:] = np.linspace(0, 65535, 32, dtype=np.uint16)[None, :]  # the full range
    grey16 = Image.fromarray(values)
    assert grey16.mode == "I;16"
    eight_bit = Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")
    expected = pixels(processor, eight_bit)
    path = tmp_path / "grey16.png"
    grey16.save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")  # stored as 16 bits
    assert torch.equal(pixels(processor, grey16), expected)
    assert torch.equal(pixels(processor, str(path)), expected)
    assert torch.equal(pixels(processor, server_decode(path.read_bytes(), "grey16")), expected)
    # mode I (32-bit) with 16-bit values, as older Pillows read 16-bit PNGs
    assert torch.equal(pixels(processor, Image.fromarray(values.astype(np.int32), "I")), expected)


def test_images_of_unknown_value_range_are_refused(processor):
    """A float image (mode F) may be 0..1, 0..255 or metres; mode I past 16 bits has no 8-bit scale: refused by name
    rather than turned black or white."""
    with pytest.raises(ValueError, match=r"medium 0 of the prompt: floating-point \(mode F\)"):
        pixels(processor, Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32), "F"))
    with pytest.raises(ValueError, match="values in 0..70000"):
        pixels(processor, Image.fromarray(np.linspace(0, 70000, 32 * 32, dtype=np.int32).reshape(32, 32), "I"))


@pytest.mark.parametrize("size", [(5000, 1), (1, 300), (0, 0), (32, 0)])
def test_thin_and_empty_images_are_refused_before_the_image_processor(processor, size):
    """A 5000x1 image is 5000 pixels, but the CLIP processor scales its short side up first (GBs at 224 px); an empty
    one divided by zero inside transformers. Refused with its size, from the processor, the server and the shards."""
    from flamingo.data.errors import SkipSample
    from flamingo.data.sources import decode_frames

    image = Image.new("RGB", size, (200, 0, 0))
    why = "aspect ratio over 200:1" if min(size) else "no pixels"
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]} image: {why}"):
        pixels(processor, image)
    with pytest.raises(ValueError, match=why):
        pixels(processor, np.zeros((size[1], size[0], 3), np.uint8))
    if min(size):  # PNG cannot store an empty image
        data = png_bytes(image)
        with pytest.raises(SkipSample, match=why):
            decode_frames(data, "thin.png")
        with pytest.raises(Exception, match=why):  # the server's 400
            server_decode(data, "thin.png")


def test_thin_videos_are_refused_by_the_processor_and_skipped_by_the_shards(processor, tmp_path):
    """A video of 404x2 frames: refused as its frames would be, skipped and counted (`bad_video`) by the loader."""
    av = pytest.importorskip("av")
    from flamingo.data.errors import SkipSample
    from flamingo.data.sources import file_ref

    path = tmp_path / "thin.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 404, 2, "yuv420p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.full((2, 404, 3), 128, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match="thin.mp4.*aspect ratio over 200:1"):
        pixels(processor, str(path))
    with pytest.raises(SkipSample, match="aspect ratio") as skipped:
        file_ref(str(path), video=True).load(fps=1.0, max_frames=4)
    assert skipped.value.reason == "bad_video"


def _write_video(path, fmt, levels):
    """A 16x16 clip at 1 frame per second, one grey level a frame, in the container `fmt`."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), level, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("fmt, name", [("mpegts", "clip.ts"), ("mpegts", "clip.mts"), ("mp4", "clip")])
def test_a_video_under_a_name_outside_the_video_extensions_is_read_as_a_video(processor, tmp_path, fmt, name):
    """What a file holds decides, not its name: an MPEG-TS clip named .ts / .mts (cameras, IPTV dumps) and an MP4
    without extension (a temporary file) read as videos, the frames `decode_video` gives."""
    from flamingo.video import decode_video

    _write_video(tmp_path / name, fmt, [40, 120, 200])
    frames = processor.load_media(str(tmp_path / name))
    assert [np.asarray(f).tolist() for f in frames] == [np.asarray(f).tolist()
                                                        for f in decode_video(str(tmp_path / name), max_frames=4)]
    assert len(frames) == 3 and pixels(processor, str(tmp_path / name)).shape[0] == 3


@pytest.mark.parametrize("fmt, name", [("mpegts", "clip.ts"), ("mpegts", "clip.mts"), ("mp4", "clip")])
def test_the_server_reads_such_a_video_in_an_image_url_part_as_the_processor_does(processor, tmp_path, fmt, name):
    """A local path (or URL) in an `image_url` part that no image reader knows is tried as a video, as the processor
    tries it: the processor's frames, not "not an image or video this server can decode"."""
    pytest.importorskip("fastapi")  # the server's extra
    from flamingo.serve.media import MediaPolicy, load_medium

    _write_video(tmp_path / name, fmt, [40, 120, 200])
    served = load_medium(name, MediaPolicy(root=tmp_path), fps=processor.video_fps, max_frames=processor.max_frames)
    assert torch.equal(processor.preprocess_media(served), pixels(processor, str(tmp_path / name)))


def test_a_file_neither_image_nor_video_names_both_tries(processor, tmp_path):
    pytest.importorskip("av")
    junk = tmp_path / "junk.ts"
    junk.write_bytes(b"neither an image nor a video" * 50)
    with pytest.raises(ValueError, match=r"cannot decode image .*junk\.ts.*cannot identify image.*nor as a video: "):
        pixels(processor, str(junk))
    pytest.importorskip("fastapi")
    from flamingo.serve.protocol import APIError

    with pytest.raises(APIError, match=r"junk\.ts: not an image or video this server can decode \(it reads PNG"):
        server_decode(junk.read_bytes(), "junk.ts")


def _size_switching_ts(sizes) -> bytes:
    """An MPEG-2 stream in MPEG-TS whose header (its first sequence) gives `sizes[0]`: two grey frames of each (W, H)
    in turn, each size from its own encoder."""
    av = pytest.importorskip("av")
    from fractions import Fraction

    buffer, pts = io.BytesIO(), 0
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=1)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuv420p"
        for i, (width, height) in enumerate(sizes):
            encoder = stream.codec_context if i == 0 else av.CodecContext.create("mpeg2video", "w")
            if i:
                encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
                encoder.time_base, encoder.framerate = Fraction(1, 1), 1
            packets = []
            for _ in range(2):
                frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 128, np.uint8), format="rgb24")
                frame.pts, frame.time_base, pts = pts, Fraction(1, 1), pts + 1
                packets += encoder.encode(frame)
            for packet in packets + list(encoder.encode()):
                packet.stream, packet.time_base = stream, Fraction(1, 1)
                container.mux(packet)
    return buffer.getvalue()


def test_a_stream_that_switches_to_larger_frames_after_its_header_is_refused(processor, tmp_path):
    """An MPEG-TS whose header says 32x32 and whose later frames are 64x64 (a small file may hold 16k x 16k frames
    that way): the server's pixel limit is checked on every decoded frame, not the header's alone; and a switch to
    frames too thin to resize is refused by the processor and skipped by the shards (`bad_video`), as a thin header
    is."""
    pytest.importorskip("fastapi")  # the server's extra
    import base64

    from flamingo.data.errors import SkipSample
    from flamingo.data.sources import file_ref
    from flamingo.serve.media import MediaPolicy, load_medium
    from flamingo.serve.protocol import APIError
    from flamingo.video import decode_video

    data = _size_switching_ts([(32, 32), (64, 64)])
    assert {f.size for f in decode_video(data, max_frames=8)} == {(32, 32), (64, 64)}  # no limit: read
    with pytest.raises(ValueError, match="64x64 frames are more than the 2048 pixels allowed"):
        decode_video(data, max_frames=8, max_pixels=2048)
    url = "data:video/mp2t;base64," + base64.b64encode(data).decode()
    with pytest.raises(APIError, match="64x64 frames are more than the 2048 pixels") as refused:
        load_medium(url, MediaPolicy(max_pixels=2048), video=True)
    assert refused.value.status == 400
    assert len(load_medium(url, MediaPolicy(max_pixels=4096), video=True)) == 4

    thin = tmp_path / "thin.ts"
    thin.write_bytes(_size_switching_ts([(16, 16), (3216, 16)]))
    with pytest.raises(ValueError, match=r"thin\.ts.*3216x16 image: aspect ratio over 200:1"):
        pixels(processor, str(thin))
    with pytest.raises(SkipSample, match="aspect ratio") as skipped:
        file_ref(str(thin), video=True).load(fps=1.0, max_frames=4)
    assert skipped.value.reason == "bad_video"


def test_transparent_video_frames_are_composited_onto_white_as_images_are(processor, tmp_path):
    """A PNG-coded `.mov` with alpha (as QuickTime RLE, ProRes 4444 and VP9-alpha clips decode): white where it is
    transparent, as the same frames as an APNG or stills, not the colour under the transparent pixels."""
    av = pytest.importorskip("av")
    stills = []
    for k in range(2):  # (H, W, 4): red, then green, opaque in the top half and transparent in the bottom
        rgba = np.zeros((32, 32, 4), np.uint8)
        rgba[..., k] = 200
        rgba[:16, :, 3] = 255
        stills.append(Image.fromarray(rgba))
    clip = tmp_path / "alpha.mov"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("png", rate=1)
        stream.width = stream.height = 32
        stream.pix_fmt = "rgba"
        for still in stills:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(still), format="rgba")))
        container.mux(stream.encode())
    frames = processor.load_media(str(clip))
    assert [np.asarray(f)[0, 0].tolist() for f in frames] == [[200, 0, 0], [0, 200, 0]]
    assert [np.asarray(f)[31, 0].tolist() for f in frames] == [[255, 255, 255]] * 2
    apng = tmp_path / "alpha.png"
    stills[0].save(apng, save_all=True, append_images=stills[1:], duration=[1000, 1000])
    assert torch.equal(pixels(processor, str(clip)), pixels(processor, str(apng)))
    assert torch.equal(pixels(processor, str(clip)), torch.cat([pixels(processor, still) for still in stills]))


def test_images_at_the_aspect_ratio_bound_are_accepted(processor):
    assert pixels(processor, Image.new("RGB", (MAX_ASPECT_RATIO, 1))).shape == (1, 3, 32, 32)
    assert pixels(processor, np.zeros((MAX_ASPECT_RATIO, 1, 3), np.uint8)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("tensor, why", [
    (torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), "floating-point dtype, got torch.uint8"),
    (torch.full((3, 32, 32), float("nan")), "NaN or infinite"),
    (torch.full((2, 3, 32, 32), float("inf")), "NaN or infinite"),
    (torch.zeros(0, 3, 32, 32), r"got shape \(0, 3, 32, 32\): no frames"),
    (torch.zeros(32, 32, 3), r"got shape \(32, 32, 3\): channels last"),
    (torch.zeros(2, 32, 32, 3), r"got shape \(2, 32, 32, 3\): channels last"),
    (torch.zeros(32, 32), r"got shape \(32, 32\)"),
])
def test_tensor_media_that_are_not_pixel_values_are_refused(processor, tensor, why):
    with pytest.raises(ValueError, match=why):
        processor.preprocess_media(tensor)


def test_long_tensor_videos_are_subsampled_as_arrays_are(processor):
    """Pixel values of 10 frames become the same 4 frames as the 10-frame array they came from."""
    video = np.stack([np.full((32, 32, 3), 20 * k, np.uint8) for k in range(10)])  # (F, H, W, 3)
    all_frames = processor.image_processor(images=list(video), return_tensors="pt")["pixel_values"]  # (10, C, H, W)
    from_array = pixels(processor, video)
    assert from_array.shape[0] == 4
    assert torch.equal(pixels(processor, all_frames), from_array)
    assert torch.equal(from_array, all_frames[uniform_frame_indices(10, 4)])


def test_an_array_or_tensor_alone_stands_for_one_medium(processor):
    """Like a path or a PIL image alone: `images=array` is `images=[array]` (it was numpy's "truth value of an array
    is ambiguous")."""
    image = np.asarray(random_image(0))
    video = np.stack([image] * 3)
    values = processor.preprocess_media(image)
    for alone in (image, video, values):
        in_list = processor("<image>x", images=[alone])["images"]
        assert torch.equal(processor("<image>x", images=alone)["images"], in_list)
        assert torch.equal(processor.encode_prompt("<image>x", alone)[1][0], processor.preprocess_media(alone))
    with pytest.raises(ValueError, match="not both"):
        processor(["x", image], images=image)
    with pytest.raises(ValueError, match="2 prompts but media lists for 1"):
        processor(["<image>x", "<image>y"], images=video)


def test_bad_arrays_are_refused_with_the_shape_given(processor):
    with pytest.raises(ValueError, match=r"medium 1 of the prompt: .*got shape \(32, 32, 1\) uint8"):
        processor("<image>a<image>b", images=[random_image(0), np.zeros((32, 32, 1), np.uint8)])
    with pytest.raises(ValueError, match=r"shape \(0, 32, 32, 3\) has no frames"):
        pixels(processor, np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="list of PIL frames has no frames"):
        pixels(processor, [])


def test_an_opened_image_is_turned_upright_like_its_file_and_only_once(processor, tmp_path):
    """A sideways JPEG opened by the caller reads as its path does; an image already turned upright (the server's
    and the shards' decoders, `upright_rgb`) carries no orientation and is not turned again."""
    from flamingo.data.sources import decode_frames

    path = save_sideways_jpeg(tmp_path / "sideways.jpg")
    expected = pixels(processor, str(path))
    with Image.open(path) as opened:
        assert torch.equal(pixels(processor, opened), expected)
        assert torch.equal(pixels(processor, opened.convert("RGB")), expected)  # convert keeps the tag
        assert processor.load_media([opened, opened])[0].size == (20, 40)  # frames too
        upright = upright_rgb(opened)
    assert upright.size == (20, 40)
    data = path.read_bytes()
    for once in (upright, decode_frames(data, "s.jpg")[0], server_decode(data, "s.jpg")):
        assert processor.load_media(once)[0].size == (20, 40)
        assert torch.equal(pixels(processor, once), expected)
