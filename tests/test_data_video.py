"""decode_video: the frame shown at each instant at `fps`, uniform cap at max_frames, only the kept frames converted,
upright by the display matrix, clear errors for bad (and truncated) files."""

import io
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

import flamingo.video as video
from flamingo.data.fixtures import frame_level, tiny_processor, video_bytes
from flamingo.video import decode_video

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


def _encode(arrays, fmt="mp4", rate=4, pts_ms=None, rotation=None, options=None) -> bytes:
    """A clip of the given (H, W, 3) uint8 frames; pts_ms: each frame's time in milliseconds (variable rate)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = arrays[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(*rotation)
        for k, arr in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
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
    # A fragmented MP4 lists only the fragments present: a cut one cannot be told from a short one, and is accepted.
    fragmented = _encode(_greys(range(0, 200, 5)), options={"movflags": "frag_keyframe+empty_moov"})
    assert 0 < len(decode_video(fragmented[: len(fragmented) // 2], max_frames=16)) < 10


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
@pytest.mark.parametrize("hflip", [False])  # a mirrored matrix is shown unmirrored (video.display_transpose)
def test_frames_are_turned_upright_by_the_display_matrix(fmt, degrees, hflip):
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation") or not hasattr(av.VideoFrame, "rotation"):
        pytest.skip("this PyAV cannot write a display matrix or read a frame's rotation")
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
