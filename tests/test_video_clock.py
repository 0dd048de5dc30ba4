"""decode_video on files whose own clock is not one plain run of frames: an MP4 cut by stream copy (an edit list
hides the pre-roll samples its track still counts) and MPEG-TS clips joined end to end (timestamps jump back)."""

import io
from fractions import Fraction

import numpy as np
import pytest

from flamingo.video import TooLong, decode_video

av = pytest.importorskip("av")

RATE = 4  # frames per second of the source clips


def _levels(frames):
    return [int(round(np.asarray(f, dtype=np.float32).mean())) for f in frames]


def _close(got, want):
    return len(got) == len(want) and all(abs(g - w) <= 4 for g, w in zip(got, want))  # lossy codec


def _source(frames: int = 24, keyframe_every: int = 12) -> bytes:
    """An MP4 of grey frames, frame k at level 10 * k, RATE a second, a keyframe every `keyframe_every` frames."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        options = {"g": str(keyframe_every), "sc_threshold": "1000000000"}  # no extra keyframes at level changes
        stream = container.add_stream("mpeg4", rate=RATE, options=options)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), 10 * k, np.uint8), "rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _stream_copy_cut(source: bytes, path, start: float, end: float) -> bytes:
    """[start, end) of `source` cut as `ffmpeg -ss start -to end -c copy` and QuickTime's trim cut it: the packets
    from the keyframe before `start`, timestamps moved so `start` is 0 (the pre-roll before it negative), which the
    MP4 muxer hides with an edit list. Its index first (faststart), so a cut-off copy still has its header."""
    with av.open(io.BytesIO(source)) as reader, av.open(str(path), "w", options={"movflags": "faststart"}) as writer:
        stream = reader.streams.video[0]
        out = writer.add_stream_from_template(stream)
        packets = [p for p in reader.demux(stream) if p.pts is not None]
        keyframe = max(p.pts for p in packets if p.is_keyframe and p.pts * stream.time_base <= start)
        shift = int(start / stream.time_base)
        for packet in packets:
            if keyframe <= packet.pts and packet.pts * stream.time_base < end:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
                writer.mux(packet)
    return path.read_bytes()


def test_a_stream_copied_mp4_cut_gives_the_frames_after_its_cut(tmp_path, conversions):
    data = _stream_copy_cut(_source(), tmp_path / "cut.mp4", 3.5, 5.5)  # frames 14..21, pre-roll 12 and 13
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert (stream.frames, float(stream.duration * stream.time_base)) == (10, 2.0)  # 10 samples, 8 shown
    assert _close(_levels(decode_video(data, fps=RATE, max_frames=16)), [10 * k for k in range(14, 22)])
    assert conversions[0] == 8  # one pass: the header's length predicted the timeline


def test_a_cut_off_copy_of_that_cut_is_still_refused(tmp_path):
    data = _stream_copy_cut(_source(), tmp_path / "cut.mp4", 3.5, 5.5)
    with av.open(io.BytesIO(data)) as container:
        fifth = [p for p in container.demux(container.streams.video[0]) if p.size][4]
        end = fifth.pos + fifth.size  # the pre-roll and 3 of the 8 frames shown
    with pytest.raises(ValueError, match=r"is truncated: decoded 3 of the 8 frames its header lists"):
        decode_video(data[:end], fps=RATE, max_frames=16)


def _ts(levels) -> bytes:
    """An MPEG-TS of grey frames at `levels`, 1 s apart, on its own clock (as each recording or segment is)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=1)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for k, level in enumerate(levels):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), level, np.uint8), "rgb24")
            frame.pts, frame.time_base = k, Fraction(1, 1)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_mpeg_ts_clips_joined_end_to_end_play_one_after_the_other():
    first, second = [20 * k for k in range(5)], [120 + 20 * k for k in range(5)]
    assert _close(_levels(decode_video(_ts(first), max_frames=16)), first)
    joined = _ts(first) + _ts(second)  # `cat a.ts b.ts`: the second's timestamps start again
    assert _close(_levels(decode_video(joined, max_frames=16)), first + second)
    assert _close(_levels(decode_video(joined, max_frames=2)), [first[2], second[2]])  # t = 2 s and 7 s
    with pytest.raises(TooLong, match="longer than the 7 s allowed"):  # its header says 5 s
        decode_video(joined, max_frames=16, max_seconds=7)


def test_avi_b_frames_decoding_times_are_reordering_not_a_new_clock(tmp_path):
    """AVI gives H.264 B-frames their decoding times, which go back by several frames at 25 fps: that is reordering,
    not clips joined end to end (only MPEG-TS and -PS timestamps may jump, FFmpeg's AVFMT_TS_DISCONT). A 4 s clip
    stays 4 s: 40 instants at 10 FPS, the frame at 3.9 s the 98th (47 instants when such times started new clocks)."""
    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV has no libx264")
    path = tmp_path / "b_frames.avi"
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("libx264", rate=25, options={"x264-params": "bframes=3:b-pyramid=normal:"
                                                                                   "keyint=50"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(100):  # a bar that grows: motion the encoder codes as B-frames of a pyramid
            pixels = np.full((48, 64, 3), _level(k), np.uint8)
            pixels[:4, :k % 64 + 1] = 255 - _level(k)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, "rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert min(b - a for a, b in zip(times, times[1:])) < -0.1  # a B-frame's time more than 0.1 s back
    frames = decode_video(str(path), fps=10, max_frames=1000)
    assert len(frames) == 40
    assert _close(_levels([f.crop((0, 8, 64, 48)) for f in frames[-1:]]), [_level(97)])


def _level(k: int) -> int:
    return (20 + 9 * k) % 240
