"""decode_video on a video whose first frame starts late on its file's clock (a cut kept on the source's timestamps,
a live recording, audio muxed first): time runs from the first frame, and the header's length, the truncation check
and `max_seconds` are measured from there too."""

import io
from fractions import Fraction

import numpy as np
import pytest

import flamingo.video as video
from flamingo.video import TooLong, decode_video

av = pytest.importorskip("av")

VIDEO_CODEC = {"matroska": "mpeg4", "webm": "libvpx", "mp4": "mpeg4", "nut": "mpeg4", "flv": "flv"}
AUDIO_CODEC = {"matroska": "aac", "webm": "libopus", "mp4": "aac"}
LEVELS = [20 * k for k in range(10)]  # frame k is grey 20 * k
LENGTH = 9.25  # 10 frames 1 s apart, the last shown for 1 / rate = 0.25 s


def _codec(name: str) -> str:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        pytest.skip(f"this PyAV cannot encode {name}")
    return name


def _encode(fmt: str, offset_ms: int, audio_from_ms=None, frames: int = 10, noise: bool = False) -> bytes:
    """`frames` grey frames (or 64x64 noise, which outweighs the header) 1 s apart from `offset_ms` on the file's
    clock (nominal rate 4), optionally with a silent audio stream from `audio_from_ms` to the video's end; packets
    are muxed in time order."""
    rng = np.random.default_rng(0)
    size = 64 if noise else 16
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(_codec(VIDEO_CODEC[fmt]), rate=4)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        packets = []  # (time in seconds, packet)
        for k in range(frames):
            pixels = rng.integers(0, 256, (size, size, 3), np.uint8) if noise else np.full((size, size, 3), LEVELS[k])
            frame = av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = offset_ms + 1000 * k, Fraction(1, 1000)
            packets += [(frame.pts / 1000, p) for p in stream.encode(frame)]
        packets += [(float("inf"), p) for p in stream.encode()]
        if audio_from_ms is not None:
            audio = container.add_stream(_codec(AUDIO_CODEC[fmt]), rate=48000)
            pts, end = audio_from_ms * 48, (offset_ms + 1000 * frames) * 48  # in 1/48000 s
            while pts < end:
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = 48000, pts, Fraction(1, 48000)
                packets += [(pts / 48000, p) for p in audio.encode(chunk)]
                pts += 960
            packets += [(float("inf"), p) for p in audio.encode()]
        for _, packet in sorted(packets, key=lambda tp: tp[0]):
            container.mux(packet)
    return buf.getvalue()


def _levels(frames):
    return [int(round(np.asarray(f, dtype=np.float32).mean())) for f in frames]


def _close(got, want):
    return len(got) == len(want) and all(abs(g - w) <= 4 for g, w in zip(got, want))  # lossy codec


def _header_seconds(data: bytes):
    with av.open(io.BytesIO(data)) as container:
        return video._header_seconds(container, container.streams.video[0])


@pytest.mark.parametrize("fmt", ["matroska", "webm", "mp4"])
@pytest.mark.parametrize("offset_ms", [0, 500, 3000])
def test_a_late_start_gives_every_frame_as_the_clip_starting_at_0(fmt, offset_ms):
    data = _encode(fmt, offset_ms)
    assert _close(_levels(decode_video(data, fps=1.0, max_frames=16)), LEVELS)  # instant j: the frame j s in
    assert _close(_levels(decode_video(data, fps=1.0, max_frames=4)), [LEVELS[i] for i in (1, 3, 6, 8)])
    assert _header_seconds(data) == pytest.approx(LENGTH)


@pytest.mark.parametrize("fmt", ["matroska", "webm", "mp4"])
def test_audio_muxed_before_a_late_video_does_not_move_its_timeline(fmt):
    data = _encode(fmt, 3000, audio_from_ms=0)  # the container starts at 0 (audio), the video at 3 s
    assert _close(_levels(decode_video(data, fps=1.0, max_frames=16)), LEVELS)
    assert _header_seconds(data) == pytest.approx(LENGTH)


@pytest.mark.parametrize(("fmt", "length"), [("nut", 9.0), ("flv", LENGTH)])  # NUT lists no last-frame duration
def test_a_container_duration_is_read_as_its_demuxer_means_it(fmt, length):
    """No stream duration or DURATION tag: NUT's container duration is an end time from 0, FLV's a length from the
    container's start; either way the header gives the video's length from its first frame."""
    data = _encode(fmt, 3000)
    assert _header_seconds(data) == pytest.approx(length)
    assert _close(_levels(decode_video(data, fps=1.0, max_frames=16)), LEVELS)


@pytest.mark.parametrize("fmt", ["matroska", "webm"])
@pytest.mark.parametrize("audio_from_ms", [None, 0])
def test_a_late_start_clip_cut_in_half_is_still_refused(fmt, audio_from_ms, tmp_path):
    data = _encode(fmt, 3000, audio_from_ms, noise=True)
    assert len(decode_video(data, max_frames=16)) == 10
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"video .*cut.mkv.* is truncated: decoded [\d.]+ s of the 9.25 s"):
        decode_video(str(cut), max_frames=16)


@pytest.mark.parametrize("fmt", ["matroska", "webm", "mp4"])
def test_max_seconds_bounds_the_clip_s_own_length(fmt):
    data = _encode(fmt, 3000)  # 9.25 s of video, ending 12.25 s into the file
    assert len(decode_video(data, max_frames=4, max_seconds=10)) == 4
    with pytest.raises(TooLong, match=r"is 9\.2 s long by its header, more than the 9 s allowed"):
        decode_video(data, max_frames=4, max_seconds=9)


def test_a_late_start_header_predicts_the_timeline_one_pass_converts_only_the_kept_frames(conversions):
    converted = conversions  # frames converted to PIL images (conftest.py)
    data = _encode("matroska", 3000)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        seconds = video._header_seconds(container, stream)
        rate = float(stream.average_rate)
    assert video._predicted_instants(0, seconds, rate, 1.0) == 10  # not 13: the 3 s before the video are not in it
    assert _close(_levels(decode_video(data, fps=1.0, max_frames=4)), [LEVELS[i] for i in (1, 3, 6, 8)])
    assert converted[0] == 4  # one pass: the predicted instants were the decoded ones
