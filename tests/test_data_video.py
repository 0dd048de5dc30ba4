"""decode_video: the frame shown at each instant at `fps` while the clip lasts, uniform cap at max_frames, only the
kept frames converted, upright by the display matrix, clear errors for bad (and truncated) files; and the data kinds
read videos and animated images with the processor's sampling (its `video_fps` and `max_frames`), an animation named
as a video as the image it is."""

import io
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import flamingo.video as video
from flamingo.data.fixtures import frame_level, mmc4_document, tiny_processor, video_bytes, write_jsonl
from flamingo.data.inspect import inspect_dataset
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec
from flamingo.video import animation_timeline, decode_video

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    path.write_bytes(video_bytes(6, rate=4))  # 6 s at 4 fps; second t is grey frame_level(t)
    return path


def _levels(frames):
    return [int(round(np.asarray(f, dtype=np.float32).mean())) for f in frames]


def _close(got, want):
    return len(got) == len(want) and all(abs(g - w) <= 4 for g, w in zip(got, want))  # lossy codec


def test_one_frame_per_second_in_order(clip):
    frames = decode_video(str(clip), fps=1.0, max_frames=10)
    assert _close(_levels(frames), [frame_level(t) for t in range(6)])
    assert frames[0].mode == "RGB" and frames[0].size == (16, 16)


def test_max_frames_caps_uniformly_and_other_fps_sample_by_timestamp(clip):
    capped = decode_video(str(clip), fps=1.0, max_frames=3)  # 6 sampled -> indices 1, 3, 5
    assert _close(_levels(capped), [frame_level(t) for t in (1, 3, 5)])
    half = decode_video(str(clip), fps=0.5, max_frames=10)  # t = 0, 2, 4
    assert _close(_levels(half), [frame_level(t) for t in (0, 2, 4)])
    dense = decode_video(clip.read_bytes(), fps=2.0, max_frames=100)  # from bytes; t = 0, 0.5, ..., 5.5
    assert _close(_levels(dense), [frame_level(k // 2) for k in range(12)])


def test_bad_files_raise_value_error_naming_them(tmp_path, clip):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[:300])
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video" * 10)
    for path in (cut, junk, tmp_path / "missing.mp4"):
        with pytest.raises(ValueError, match=path.name):
            decode_video(str(path))
    with pytest.raises(ValueError, match="cannot decode video .*junk.mp4"):  # PyAV's own ValueError, worded by us
        decode_video(str(junk))


def test_processor_loads_video_files_through_decode_video(clip):
    processor = tiny_processor(max_frames=4)
    pixels = processor.preprocess_media(str(clip))
    assert pixels.shape == (4, 3, 32, 32)  # 6 frames at 1 FPS, uniformly capped at the processor's 4


def _encode(arrays, fmt="mp4", rate=4, pts_ms=None, rotation=None, options=None, codec="mpeg4",
            last_ms=None) -> bytes:
    """A clip of the given (H, W, 3) uint8 frames; pts_ms: each frame's time in milliseconds (variable rate);
    last_ms: how long the last frame is shown (its packet's duration), when not the rate's."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = arrays[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(*rotation)
        packets = []
        for k, arr in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            packets += stream.encode(frame)
        packets += stream.encode()
        if last_ms is not None:
            last = max(packets, key=lambda p: p.pts)
            last.duration = int(Fraction(last_ms, 1000) / last.time_base)
        container.mux(packets)
    return buf.getvalue()


def _greys(levels, size=16):
    return [np.full((size, size, 3), v, np.uint8) for v in levels]


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_memory_is_bounded_by_max_frames_not_by_length(fmt, conversions):
    data = _encode(_greys([2 * (k % 120) for k in range(240)]), fmt=fmt, rate=1)  # 240 s at 1 fps
    frames = decode_video(data, fps=1.0, max_frames=4)  # instants 30, 90, 150, 210
    assert conversions[0] == 4
    assert _close(_levels(frames), [60, 180, 60, 180])


def test_a_second_pass_converts_only_the_chosen_frames(monkeypatch, conversions, clip):
    monkeypatch.setattr(video, "_predicted_instants", lambda *a: 0)  # a header that does not tell the timeline

    class Pipe(io.RawIOBase):  # not seekable: decode_video keeps the bytes to read them twice
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self.data.readinto(b)

    frames = decode_video(Pipe(clip.read_bytes()), fps=1.0, max_frames=3)
    assert conversions[0] == 3 and _close(_levels(frames), [frame_level(t) for t in (1, 3, 5)])
    with open(clip, "rb") as f:  # a seekable file object is read again from where it stood
        assert _close(_levels(decode_video(f, fps=2.0, max_frames=100)), [frame_level(k // 2) for k in range(12)])


def test_variable_rate_takes_the_frame_shown_at_each_instant_repeating_across_gaps():
    levels = [0, 40, 80, 120, 160, 200]
    vfr = _encode(_greys(levels), fmt="matroska", rate=25, pts_ms=[0, 100, 200, 3000, 3100, 6000])
    shown = [0, 2, 2, 3, 4, 4, 5]  # at t = 0..6 s: frame 2 stays on screen from 0.2 s to 3.0 s
    assert _close(_levels(decode_video(vfr, fps=1.0, max_frames=16)), [levels[i] for i in shown])
    assert _close(_levels(decode_video(vfr, fps=1.0, max_frames=3)), [levels[i] for i in (2, 3, 4)])
    cfr = _encode(_greys([20 * k for k in range(10)]), rate=Fraction(5, 2))  # a frame every 0.4 s
    assert _close(_levels(decode_video(cfr, fps=1.0)), [0, 40, 100, 140])  # frames 0, 2 (0.8 s), 5 (2.0 s), 7 (2.8 s)


def test_truncated_matroska_is_refused_by_its_header_duration(tmp_path):
    rng = np.random.default_rng(0)
    data = _encode([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(40)], fmt="matroska")  # 10 s
    assert len(decode_video(data, max_frames=16)) == 10
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"video .*cut.mkv.* is truncated: decoded [\d.]+ s of the 10.00 s"):
        decode_video(str(cut))
    # an MP4 cut in half (its header, written last, lost with the frames): a plain error, no Python attribute error
    mp4 = _encode(_greys([2 * k for k in range(12)]), rate=2)
    with pytest.raises(ValueError, match=r"^cannot decode video '<in-memory video>': (its video stream has no decoder|"
                                         r"(?!.*AttributeError))"):
        decode_video(mp4[: len(mp4) // 2], max_frames=4)
    # A fragmented MP4 lists only the fragments present: a cut one cannot be told from a short one, and is accepted.
    fragmented = _encode(_greys(range(0, 200, 5)), options={"movflags": "frag_keyframe+empty_moov"})
    assert 0 < len(decode_video(fragmented[: len(fragmented) // 2], max_frames=16)) < 10


SLIDES = [0, 100, 200]  # grey levels of three frames


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "mpeg4"), ("matroska", "mpeg4"), ("webm", "libvpx")])
def test_a_last_frame_shown_longer_than_a_step_is_sampled_while_it_is(fmt, codec, conversions):
    """A slideshow (a frame every 5 s, each shown 5 s) gives 15 instants at 1 FPS, its last slide as often as the
    others, as the same slides as an animation do; a recording ending on a still screen (frames at 0, 1, 2 s, the last
    shown 8 s) lasts its 10 s: not truncated, and its held frame converted only where an instant is kept."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV cannot encode {codec}")
    slides = _encode(_greys(SLIDES), fmt=fmt, rate=Fraction(1, 5), codec=codec)
    shown = animation_timeline([5.0, 5.0, 5.0], fps=1.0, max_frames=16)
    assert shown == [0] * 5 + [1] * 5 + [2] * 5
    assert _close(_levels(decode_video(slides, fps=1.0, max_frames=16)), [SLIDES[i] for i in shown])
    held = _encode(_greys(SLIDES), fmt=fmt, rate=25, pts_ms=[0, 1000, 2000], last_ms=8000, codec=codec)
    assert _close(_levels(decode_video(held, fps=1.0, max_frames=16)), [0, 100] + [200] * 8)
    conversions[0] = 0
    assert _close(_levels(decode_video(held, fps=1.0, max_frames=4)), [100, 200, 200, 200])  # instants 1, 3, 6, 8
    assert conversions[0] == 4


def test_a_huge_last_frame_duration_costs_its_kept_instants_only(monkeypatch):
    """A last frame shown 10^12 s (a damaged or crafted packet duration): the held tail converts only its kept
    instants (it walked every instant, hours), and the header's length bounds how long the frame is held."""
    try:
        held = _encode(_greys(SLIDES), fmt="matroska", rate=25, pts_ms=[0, 1000, 2000], last_ms=10**15, codec="mpeg4")
    except OverflowError:  # PyAV 15 - 16 hold a packet's duration in 32 bits
        pytest.skip(f"PyAV {av.__version__} cannot write a packet duration of 10^15 ms (17 on can)")
    start = time.perf_counter()
    assert _close(_levels(decode_video(held, fps=1.0, max_frames=4)), [200] * 4)  # all four in the held tail
    assert time.perf_counter() - start < 5  # (was linear in the duration: 10^8 s took 8 s)
    monkeypatch.setattr(video, "_header_seconds", lambda container, stream: 4.0)  # a header saying 4 s
    assert _close(_levels(decode_video(held, fps=1.0, max_frames=16)), [0, 100, 200, 200])


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_clips_at_or_above_the_sampling_rate_keep_one_instant_per_step_up_to_their_last_frame(fmt):
    """Frames evenly spaced no further apart than a step: the instants up to the last frame's start, whatever the
    last frame's duration adds (a 30 fps clip of 2 s, a 1 fps clip of 4 frames, an NTSC clip of 3.003 s: 2, 4, 3)."""
    thirty = _encode(_greys([4 * k for k in range(60)]), fmt=fmt, rate=30)
    assert _close(_levels(decode_video(thirty, fps=1.0, max_frames=16)), [0, 120])  # frames 0 and 30
    one = _encode(_greys([0, 60, 120, 180]), fmt=fmt, rate=1)
    assert _close(_levels(decode_video(one, fps=1.0, max_frames=16)), [0, 60, 120, 180])
    ntsc = _encode(_greys([3 * k for k in range(72)]), fmt=fmt, rate=Fraction(24000, 1001))
    assert _close(_levels(decode_video(ntsc, fps=1.0, max_frames=16)), [0, 69, 141])  # frames 0, 23, 47


def _animations(tmp_path, delays_ms):
    """The same frames as a GIF, an APNG and an animated WebP under `tmp_path`: their names."""
    from test_animation import animation

    names = []
    for fmt, suffix in (("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")):
        (tmp_path / f"a.{suffix}").write_bytes(animation(fmt, delays_ms))
        names.append(f"a.{suffix}")
    return names


def _encoded(path, kind, processor, **options):
    spec = DatasetSpec.create("d", kind, path, 1, {"shuffle": False, **options}, processor)
    return [spec.encode(record) for record in read_records(path)]


def test_animated_images_in_pairs_and_documents_take_the_processors_max_frames(tmp_path):
    """A 10 s GIF in a pairs row or a document, for a model of 4 frames: the processor's 4 frames, not 8 (the
    resampler has time embeddings for 4); inspect counts the same. A `max_frames` option over the processor's is
    refused when the dataset is made, not at the first batch."""
    from test_animation import animation

    processor = tiny_processor(max_frames=4)
    (tmp_path / "a.gif").write_bytes(animation("GIF", [2000] * 5))  # 10 instants at 1 FPS
    expected = processor.preprocess_media(str(tmp_path / "a.gif"))
    assert expected.shape[0] == 4
    pairs = write_jsonl(str(tmp_path / "pairs.jsonl"), [{"image": "a.gif", "caption": "a square"}])
    docs = write_jsonl(str(tmp_path / "docs.jsonl"), [mmc4_document(2, {0: 1}, image_names=["a.gif"])])
    for kind, path, options in (("pairs", pairs, {}), ("interleaved", docs, {"image_dir": str(tmp_path)})):
        (encoded,) = _encoded(path, kind, processor, **options)
        assert torch.equal(encoded.media[0], expected), kind
        assert inspect_dataset(path, kind, processor, options=options).frames == 4, kind
    videos = write_jsonl(str(tmp_path / "videos.jsonl"), [{"video": "a.gif", "caption": "a square"}])
    for kind in ("video", "chat"):
        with pytest.raises(ValueError, match=r"max_frames=16 is more than the processor's max_frames=4"):
            DatasetSpec.create("d", kind, videos, 1, {"max_frames": 16}, processor)
    assert DatasetSpec.create("d", "video", videos, 1, {"max_frames": 2}, processor).max_frames == 2


def test_an_animation_named_as_a_video_reads_as_the_processor_reads_it(tmp_path):
    """A GIF, APNG or animated WebP in a `video` row or a chat `video_url` part: the frames of the processor (by the
    frames' own delays), not PyAV's (another clock for GIF and APNG, no animated WebP at all)."""
    processor = tiny_processor(max_frames=8)
    names = _animations(tmp_path, [2000, 2000, 2000])  # 6 instants at 1 FPS
    videos = write_jsonl(str(tmp_path / "videos.jsonl"), [{"video": n, "caption": "squares"} for n in names])
    chats = write_jsonl(str(tmp_path / "chats.jsonl"), [{"messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": n}}, {"type": "text", "text": "Hm?"}]},
        {"role": "assistant", "content": "Squares."}]} for n in names])
    for kind, path in (("video", videos), ("chat", chats)):
        encoded = _encoded(path, kind, processor)
        assert len(encoded) == len(names), kind  # none skipped as bad_video
        for name, sample in zip(names, encoded, strict=True):
            expected = processor.preprocess_media(str(tmp_path / name))
            assert expected.shape[0] == 6
            assert torch.equal(sample.media[0], expected), (kind, name)


def test_the_data_kinds_sample_videos_at_the_processors_rate(tmp_path):
    """A model saved with `video_fps: 2` is trained on videos at 2 FPS, as it is evaluated and served, unless a
    dataset's `fps` says otherwise."""
    processor = tiny_processor(max_frames=16)
    processor.video_fps = 2.0
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_bytes(3, rate=4))
    videos = write_jsonl(str(tmp_path / "videos.jsonl"), [{"video": "clip.mp4", "caption": "grey"}])
    for kind in ("video", "chat"):
        spec = DatasetSpec.create("d", kind, videos, 1, {}, processor)
        assert (spec.options["fps"], spec.options["max_frames"]) == (2.0, 16)
        assert (spec.fps, spec.max_frames) == (2.0, 16)
    assert DatasetSpec.create("d", "video", videos, 1, {"fps": 1.0}, processor).fps == 1.0
    (encoded,) = _encoded(videos, "video", processor)
    assert encoded.media[0].shape[0] == 6  # 3 s at 2 FPS
    assert torch.equal(encoded.media[0], processor.preprocess_media(str(clip)))


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
@pytest.mark.parametrize("hflip", [False])  # a mirrored matrix is shown unmirrored (video.display_transpose)
def test_frames_are_turned_upright_by_the_display_matrix(fmt, degrees, hflip):
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation") or not hasattr(av.VideoFrame, "rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display matrix or read a frame's rotation (18 on can)")
    stored = np.zeros((16, 32, 3), np.uint8)  # (H, W, 3): four 8x16 quadrants of distinct greys
    for (r, c), v in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [0, 80, 160, 240]):
        stored[8 * r:8 * r + 8, 16 * c:16 * c + 16] = v
    data = _encode([stored] * 2, fmt=fmt, rotation=(degrees, hflip))  # a player rotates it CCW, then mirrors
    want = Image.fromarray(stored).rotate(degrees, expand=True)
    want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if hflip else want
    got = decode_video(data, max_frames=1)[0]
    assert got.size == want.size
    h, w = got.height // 2, got.width // 2
    quads = [(x, y, x + w, y + h) for y in (0, h) for x in (0, w)]
    assert _close(_levels(got.crop(q) for q in quads), _levels(want.crop(q) for q in quads))


def test_a_video_longer_than_max_seconds_is_refused_by_header_or_while_decoding(conversions, monkeypatch):
    """A server's bound on decoding time: a header listing more than `max_seconds` is refused before any frame is
    decoded; one listing no duration is refused once decoding passes it."""
    from flamingo import video
    from flamingo.video import TooLong

    frames = _greys([2 * (k % 120) for k in range(20)])
    plain = _encode(frames, rate=1)  # 20 s
    assert len(decode_video(plain, max_frames=4, max_seconds=20)) == 4
    with pytest.raises(TooLong, match=r"video '<in-memory video>' is 20\.0 s long by its header, more than the 10 s"):
        decode_video(plain, max_frames=4, max_seconds=10)
    assert conversions[0] == 4  # the refused one converted nothing
    monkeypatch.setattr(video, "_header_seconds", lambda container, stream: None)  # a header without a duration
    with pytest.raises(TooLong, match="is longer than the 10 s allowed"):
        decode_video(plain, max_frames=4, max_seconds=10)



def test_decoding_leaves_no_frame_for_the_garbage_collector():
    """A PyAV frame in a reference cycle (reading `frame.side_data` makes one) frees FFmpeg's thread pool when the
    collector gets to it; in a process forked meanwhile (a DataLoader worker, the demo's world writers) that waited
    forever. Decoding, and refusing, leave every frame to reference counting."""
    import gc

    from flamingo.video import TooLong

    data = _encode(_greys([2 * k for k in range(12)]), rate=2)
    gc.collect()
    gc.disable()
    try:
        def frames() -> int:
            return sum(type(o).__name__ == "VideoFrame" for o in gc.get_objects())

        before = frames()
        decode_video(data, max_frames=4)
        with pytest.raises(TooLong):
            decode_video(data, max_frames=4, max_seconds=2)
        with pytest.raises(ValueError):
            decode_video(data[: len(data) // 2], max_frames=4)
        assert frames() == before
    finally:
        gc.enable()
