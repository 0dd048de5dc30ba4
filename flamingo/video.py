"""Video decoding with PyAV: the frame shown at each instant of a fixed-rate timeline, uniformly capped at `max_frames`.

The paper samples training and evaluation videos at 1 FPS; a clip longer than the model's learned time embeddings
(`max_frames`) is sub-sampled uniformly (`uniform_frame_indices`, which the processor uses for frame lists too).
Only the kept frames are converted to images, so memory is bounded by `max_frames` frames, not by the clip's length.
Videos are read in the containers `flamingo.runtime.media_formats.VIDEO_CONTAINERS` lists, from their own bytes only
(`open_container`).
"""

from __future__ import annotations

import bisect
import io
import math
import os
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Optional, Union

from PIL import Image

from .runtime.media_formats import VIDEO_CONTAINER_NAMES, VIDEO_CONTAINERS

if TYPE_CHECKING:
    import av

VideoInput = Union[str, "os.PathLike[str]", bytes, BinaryIO]

# A clip whose header promises N frames (or T seconds, when it lists no frame count) but decodes to fewer than this
# fraction of them is treated as truncated.
_TRUNCATED_FRACTION = 0.9
# A frame time this close to a sampling instant counts as at it (float rounding of timestamps; far below a frame).
_TIME_TOLERANCE = 1e-4
# A frame this many seconds before the previous one starts a new clock (clips joined with `cat`, an MPEG-TS
# discontinuity): the timeline continues after the previous frame, as FFmpeg's command line does (ffmpeg_demux.c:
# a timestamp 0.1 s behind the last one read) in a format whose timestamps may jump (AVFMT_TS_DISCONT: MPEG-TS and
# -PS). Elsewhere times that go back are reordering, not a new clock: AVI gives B-frames decoding times.
_JUMP_BACK_SECONDS = 0.1
_TS_DISCONT = 0x0200  # libavformat's AVFMT_TS_DISCONT, in `InputContainer.format.flags`

# A frame's display rotation (degrees counter-clockwise, as PyAV's `VideoFrame.rotation` gives it) -> the PIL
# transpose that shows it as players do.
_ROTATION_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                       270: Image.Transpose.ROTATE_270}


# Images (processing.to_rgb) and videos (decode_video: the header's and every decoded frame's size) alike: the
# longest side may be at most this many times the shortest (Qwen2-VL's bound). Image processors that resize the
# shortest side to S before cropping (CLIP) hold S x (S * ratio) pixels: a 5000x1 image at S = 224 takes GBs.
MAX_ASPECT_RATIO = 200


def import_av() -> Any:
    """PyAV, imported when a video comes (only videos need it); missing, an ImportError that says how to install it."""
    try:
        import av
    except ImportError as e:
        raise ImportError("videos need PyAV (av): pip install 'flamingo-vlm[video]'") from e
    return av


def check_image_size(width: int, height: int) -> None:
    """Refuse an image with an empty side or an aspect ratio over `MAX_ASPECT_RATIO`:1, before an image processor
    resizes it."""
    if min(width, height) <= 0:
        raise ValueError(f"{width}x{height} image: no pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{width}x{height} image: aspect ratio over {MAX_ASPECT_RATIO}:1, too thin to resize (the "
                         "image processor scales the short side up first)")


def uniform_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Indices of at most `max_frames` frames spread uniformly over a clip of `num_frames` (all if it is short)."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [int((i + 0.5) * num_frames / max_frames) for i in range(max_frames)]


def _describe(path: VideoInput) -> str:
    if isinstance(path, (str, os.PathLike)):
        return repr(os.fspath(path))
    return repr(getattr(path, "name", "<in-memory video>"))


def _opener(path: VideoInput) -> Callable[[], Union[str, BinaryIO]]:
    """-> a function giving `av.open` a fresh view of the video each call (decoding may take two passes)."""
    if isinstance(path, (str, os.PathLike)):  # absolute: FFmpeg reads `name:rest` as a protocol's URL
        return lambda: os.path.abspath(os.fspath(path))
    if isinstance(path, bytes):
        return lambda: io.BytesIO(path)
    if not path.seekable():  # a pipe or socket: keep the compressed bytes to read them again
        data = path.read()
        return lambda: io.BytesIO(data)
    file, start = path, path.tell()

    def rewound() -> BinaryIO:
        file.seek(start)
        return file

    return rewound


# FFmpeg's demuxers whose header declares no stream (FLV, MPEG-PS): their streams appear while
# `avformat_find_stream_info` probes them, and PyAV gives decoder options only to the streams a header declares
_STREAMS_FOUND_PROBING = {"flv", "mpeg"}
_PROBE_BYTES = 5_000_000  # FFmpeg's `probesize`: the packets probing reads at most
# the frames probing decodes once one has come (avformat_find_stream_info decodes until it knows a stream's size and
# pixel format, and an H.264 stream's reordering delay: has_decode_delay_been_guessed, at most 20 frames)
_PROBE_FRAMES = 20


def decoder_cap(max_pixels: int) -> int:
    """The `max_pixels` option to give FFmpeg's decoders so that they refuse no frame `_check_frame_size` passes (of
    at most `max_pixels`, its sides at most `MAX_ASPECT_RATIO`:1).

    A decoder checks its padded buffers, not the frame: its width rounded up to 64 times its height, and MPEG-4
    part 2's, H.263's and Sorenson's (FLV1) (width + 128, rounded up to 64) x 280 however low the frame (an 8000x40
    FLV1 frame needs 2.28 M). A passing frame's longest side is at most sqrt(MAX_ASPECT_RATIO * max_pixels).
    """
    side = math.isqrt(MAX_ASPECT_RATIO * max_pixels) + 1
    return max(max_pixels + 64 * side, 288 * (side + 192))


def open_container(av: Any, source: Union[str, BinaryIO], name: str,
                   max_pixels: Optional[int] = None) -> "av.container.InputContainer":
    """`av.open(source)` for reading, limited to the demuxers of `VIDEO_CONTAINERS` and to reading `source` alone.

    FFmpeg picks a demuxer by what the bytes hold, and some open what the file names: concat reads other files
    (relative to the working directory), SDP binds UDP ports and waits for them, HLS fetches URLs. A path opens by the
    `file` protocol only, a file object with no protocol at all ("none" names none). Another container raises an
    `UnlistedContainer` naming the ones read, before its demuxer reads its header.
    Opening decodes a stream's first frames (FFmpeg's `avformat_find_stream_info`): `max_pixels`, with room for
    their padding (`decoder_cap`), is the decoders' own cap on their size, so a far larger frame is not decoded there
    (a 16000x16000 H.264 frame: 500 MiB). Such a stream opens with its size unread (0x0; H.264's and VP8's keep their
    header's). PyAV gives the cap only to the streams a header declares, not to FLV's and MPEG-PS's
    (`_STREAMS_FOUND_PROBING`): those are first opened with no decoder, and the frames probing would decode are
    decoded under the cap (`_probed_size_over`); a stream over `max_pixels` there (its parser's size, or a frame's:
    it may grow after its first) is returned with that size (0x0 where the cap stopped the decoder), decoding nothing
    more. The decoders that then read the returned container's frames have the same cap: a frame far over it, past
    the frames opening decoded, is refused by the decoder (an FFmpeg error) rather than decoded and then refused.
    """
    if max_pixels is None:
        return _open(av, source, name, decode=True)
    start = source.tell() if not isinstance(source, str) else 0
    container = _open(av, source, name, decode=False)
    over = _probed_size_over(container, max_pixels)
    container.close()
    if not isinstance(source, str):
        source.seek(start)
    if over is None:
        container = _open(av, source, name, decode=True, max_pixels=max_pixels)
        for stream in container.streams.video:  # the decoders that read its frames (`av.open` caps probing's only)
            if stream.codec_context is not None:
                stream.codec_context.options = {"max_pixels": str(decoder_cap(max_pixels))}
        return container
    container = _open(av, source, name, decode=False)  # its decoders unopened: the size its caller reads, refuses
    container.streams.video[0].codec_context.width, container.streams.video[0].codec_context.height = over
    return container


def _open(av: Any, source: Union[str, BinaryIO], name: str, decode: bool,
          max_pixels: Optional[int] = None) -> "av.container.InputContainer":
    """`open_container`'s `av.open`; without `decode`, probing decodes no frame (no decoder is on FFmpeg's
    `codec_whitelist`: a stream's size is then what its header or parser gives)."""
    options = {"format_whitelist": ",".join(VIDEO_CONTAINERS),
               "protocol_whitelist": "file" if isinstance(source, str) else "none"}
    if not decode:
        options["codec_whitelist"] = "none"
    decoders = {"max_pixels": str(decoder_cap(max_pixels))} if max_pixels is not None else {}  # (the header's only)
    einval = getattr(av.error, "ArgumentError", None) or av.error.ValueError  # PyAV 18's name, 15's
    try:
        return av.open(source, options=decoders, container_options=options)
    except einval:  # EINVAL: the probed demuxer, or a protocol it asked for, is not listed
        raise UnlistedContainer(f"cannot decode video {name}: not in a container read here "
                                f"({VIDEO_CONTAINER_NAMES})") from None


def _probed_size_over(container: "av.container.InputContainer", max_pixels: int) -> Optional[tuple[int, int]]:
    """An FLV's or MPEG-PS's first video stream, opened with no decoder: the size over `max_pixels` its parser read,
    or of a frame probing would decode (its first `_PROBE_FRAMES`, in at most `_PROBE_BYTES` of packets), decoded
    under `decoder_cap`; (0, 0) where that cap or bad data stops the decoder; None when they fit, or in another
    container, or with no video stream."""
    video = container.streams.video
    if not set(container.format.name.split(",")) & _STREAMS_FOUND_PROBING or not video \
            or video[0].codec_context is None:
        return None
    width, height = video[0].codec_context.width, video[0].codec_context.height
    if width * height > max_pixels:
        return width, height
    video[0].codec_context.options = {"max_pixels": str(decoder_cap(max_pixels))}
    read = decoded = 0
    try:
        for packet in container.demux(video[0]):
            read += packet.size
            for frame in packet.decode():
                if frame.width * frame.height > max_pixels:
                    return frame.width, frame.height
                decoded += 1
            if decoded >= _PROBE_FRAMES or read > _PROBE_BYTES:
                break
    except Exception:  # FFmpeg's errors (the cap's EINVAL or ENOMEM, bad data), PyAV's others
        return 0, 0
    return None


def display_transpose(frame: "av.VideoFrame") -> Optional[Image.Transpose]:
    """The transpose that turns a decoded frame upright by its display rotation (a phone's), or None.

    Read from `frame.rotation` (PyAV 18.1 has it, 14.0 not: frames then stay as stored), not from
    `frame.side_data`, which ties the frame into a reference cycle: a frame left for the garbage collector frees
    FFmpeg's thread pool when collected, which in a process forked meanwhile (a DataLoader worker) waits forever.
    A mirrored display matrix is shown unmirrored; a rotation that is not a multiple of 90 degrees is ignored.
    """
    degrees = getattr(frame, "rotation", None)
    return _ROTATION_TRANSPOSE.get(int(degrees) % 360) if degrees is not None else None


def composite_on_white(image: Image.Image) -> Image.Image:
    """An image with transparency -> RGB, composited onto white as HF's image processors convert it
    (`convert_to_rgb`); a plain `convert("RGB")` keeps the colour under transparent pixels."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def frame_to_image(frame: "av.VideoFrame") -> Image.Image:
    """A decoded frame -> an upright RGB image, as `upright_rgb` reads a still: turned by its display rotation (as a
    still by its EXIF orientation), and a frame with alpha (PNG or QuickTime RLE `.mov`, ProRes 4444, VP9 with
    alpha) composited onto white (`composite_on_white`)."""
    pixel_format = frame.format
    if pixel_format.has_palette or any(component.is_alpha for component in pixel_format.components):
        image = composite_on_white(Image.fromarray(frame.to_ndarray(format="rgba")))  # (H, W, 4)
    else:
        image = frame.to_image().convert("RGB")
    transpose = display_transpose(frame)
    return image.transpose(transpose) if transpose is not None else image


class UnlistedContainer(ValueError):
    """A video in a container `open_container` does not read."""


class TooLong(ValueError):
    """A video longer than the `max_seconds` its reader accepts."""


class TooManyPixels(ValueError):
    """A medium refused by the `max_pixels` its reader accepts (a server's bound, the loaders' `default_max_pixels`),
    raised where that cap is checked: a frame of `width` x `height` over it (0x0 where the size is not known: a
    capped decoder left it unread); `frame`: the frame's index in an image file (a multi-page TIFF's pages each have
    their own size), None in a video. Callers naming the cap's knob catch this type."""

    def __init__(self, width: int, height: int, frame: Optional[int], max_pixels: int,
                 message: Optional[str] = None) -> None:
        super().__init__(message or f"frame {frame}: {width}x{height} is more than the {max_pixels} pixels allowed")
        self.width, self.height, self.frame, self.max_pixels = width, height, frame, max_pixels

    def reworded(self, message: str) -> "TooManyPixels":
        """The same refusal (class and fields), fresh (no traceback), under `message` (a caller's wording)."""
        return type(self)(self.width, self.height, self.frame, self.max_pixels, message)

    def __reduce__(self) -> tuple[type, tuple[int, int, Optional[int], int, str]]:
        # pickled by its fields (a DataLoader worker's error crosses to the main process so)
        return type(self), (self.width, self.height, self.frame, self.max_pixels, str(self))


class TooManyAnimationPixels(TooLong, TooManyPixels):
    """An animation of more frames x canvas (`width` x `height`) than its reader decodes under its `max_pixels`
    (`processing.ANIMATION_PIXELS` such images): too long, by the pixel cap."""


def _shown_seconds(frame: "av.VideoFrame") -> Optional[float]:
    """How long a decoded frame stays on screen by its own duration (its packet's), None when the file says none."""
    duration, time_base = getattr(frame, "duration", None), frame.time_base  # older PyAVs have no frame.duration
    return float(duration * time_base) if duration and time_base and frame.time is not None else None


def _timeline_length(last: float, shown: Optional[float], step: float) -> int:
    """The number of sampling instants j * step in a clip whose last frame starts `last` s after its first and stays
    on screen `shown` s (None: unknown).

    The instants up to the last frame's start and, when that frame stays longer than a step (a slideshow, a
    recording ending on a still screen, a clip slower than the sampling rate), those while it does, as
    `animation_timeline` counts them. A last frame shown no longer than a step adds none after its start: a
    constant-rate clip sampled at most at its own rate keeps one instant per step up to its last frame (N for an
    N-second clip at 1 FPS, 3 for an NTSC clip of 3.003 s), whatever rounding its timestamps carry.
    """
    count = int((last + _TIME_TOLERANCE) / step) + 1
    if shown is not None and shown > step + _TIME_TOLERANCE:
        count = max(count, math.ceil((last + shown) / step - _TIME_TOLERANCE))
    return count


def _check_frame_size(name: str, width: int, height: int, max_pixels: Optional[int]) -> None:
    """A video's frame size (from its header, or a decoded frame's: a stream may change size midway) -> ValueError
    naming the video when an image of that size would be refused (`check_image_size`) or it is over `max_pixels`."""
    try:
        check_image_size(width, height)
    except ValueError as e:
        raise ValueError(f"video {name}: {e}") from None
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(width, height, None, max_pixels,
                            f"video {name}: {width}x{height} frames are more than the {max_pixels} pixels allowed")


def _sample(frames: Iterable["av.VideoFrame"], step: float, rate: Optional[float], keep: set[int], name: str,
            stop_when_kept: bool = False, max_seconds: Optional[float] = None, max_pixels: Optional[int] = None,
            seconds: Optional[float] = None, clock_jumps: bool = False
            ) -> tuple[dict[int, Image.Image], int, int, Optional[float], Optional[float]]:
    """Walk the decoded frames; instant j (time j * step from the first frame) takes the frame shown at it.

    The frame shown at t is the last one whose time is at or before t, so a frame repeats over a gap in a
    variable-rate clip; the last frame is shown while the clip lasts (`_timeline_length`). With `clock_jumps` (a
    format whose timestamps may jump, `_clock_may_jump`), a frame more than `_JUMP_BACK_SECONDS` before the previous
    one (clips joined end to end, each on its own clock) continues the timeline: it and the frames after it are
    moved to start when the previous frame ends. Only instants in `keep`
    are converted to images; with `stop_when_kept`, decoding stops once they all are. Each frame's size is checked
    (`_check_frame_size`) before it is converted. A frame past `max_seconds` raises `TooLong` (decoding stops there).
    seconds: the clip's length by its header (from its first frame), which the last frame is not held past.
    Returns:
        (images by instant, number of instants, frames decoded, time of the last decoded frame on the file's clock
        (continued past its jumps back), seconds that frame is shown by its own duration or None).
    """
    images: dict[int, Image.Image] = {}
    instants = decoded = 0
    start: Optional[float] = None
    last: Optional[float] = None
    stamp: Optional[float] = None  # the previous frame's time as the file gives it
    offset = 0.0  # added to the file's times since its last jump back
    size = (0, 0)
    previous = None  # the frame on screen until the current one
    last_kept = max(keep, default=-1)
    for frame in frames:
        read = frame.time if frame.time is not None else (decoded / rate if rate else float(decoded))
        if clock_jumps and stamp is not None and read < stamp - _JUMP_BACK_SECONDS:  # a new clock: go on after it
            offset += stamp + (_shown_seconds(previous) or (1 / rate if rate else 0.0)) - read
        stamp = read
        last = read + offset
        decoded += 1
        if (frame.width, frame.height) != size:
            size = (frame.width, frame.height)
            _check_frame_size(name, *size, max_pixels)
        if start is None:
            start = last
        t = last - start
        if max_seconds is not None and t > max_seconds:
            raise TooLong(f"longer than the {max_seconds:g} s allowed")
        while instants * step <= t + _TIME_TOLERANCE:
            if instants in keep:
                gap = instants * step < t - _TIME_TOLERANCE and previous is not None
                images[instants] = frame_to_image(previous if gap else frame)
            instants += 1
        previous = frame
        if stop_when_kept and instants > last_kept:
            return images, instants, decoded, last, None
    if previous is None or last is None or start is None:
        return images, instants, decoded, last, None
    shown = _shown_seconds(previous)
    if shown is not None and seconds is not None:  # a damaged or crafted frame duration: the header's end bounds it
        shown = min(shown, max(seconds - (last - start), 0.0))
    total = _timeline_length(last - start, shown, step)
    if max_seconds is not None and (total - 1) * step > max_seconds:
        raise TooLong(f"longer than the {max_seconds:g} s allowed")
    for j in sorted(k for k in keep if instants <= k < total):  # the kept instants where the last frame is held
        images[j] = frame_to_image(previous)
    return images, max(instants, total), decoded, last, shown


def _predicted_instants(frames: int, seconds: Optional[float], rate: Optional[float], step: float) -> int:
    """The number of sampling instants a constant-rate clip's header implies (0 when it cannot tell)."""
    if not rate or not (frames or seconds):
        return 0
    last = (frames - 1) / rate if frames else seconds - 1 / rate
    return _timeline_length(last, 1 / rate, step) if last >= 0 else 0


def _video_start(stream: "av.VideoStream") -> float:
    """The video's first frame time on the file's clock: FFmpeg's stream start time (from the header or the first
    packets), 0 when it has none."""
    if stream.start_time is None or not stream.time_base:
        return 0.0
    return float(stream.start_time * stream.time_base)


# Demuxers whose container duration is the file's end time (its last timestamp plus duration, measured from 0), not a
# length measured from the container's start as FFmpeg computes it for the others.
_DURATION_IS_END_TIME = {"matroska", "webm", "nut"}


def _header_seconds(container: "av.container.InputContainer", stream: "av.VideoStream") -> Optional[float]:
    """The video's length from its first frame (`_video_start`) as its header lists it; None if it lists none.

    The stream's own duration first (FFmpeg measures it from the stream's start), else a Matroska track's DURATION
    tag, else the container's duration. The tag, and a Matroska or NUT container's duration, are end times measured
    from 0: a video starting late (a cut kept on the source's clock, a live recording, audio muxed first) starts
    `_video_start` into them. Other containers' durations run from the container's start (its earliest stream).
    """
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    start = _video_start(stream)
    seconds: Optional[float] = None
    tag = stream.metadata.get("DURATION")  # Matroska/WebM: "HH:MM:SS.nnnnnnnnn" per track
    if tag:
        try:
            h, m, s = tag.split(":")
            seconds = int(h) * 3600 + int(m) * 60 + float(s) - start
        except ValueError:
            pass
    if seconds is None and container.duration:
        names = set(container.format.name.split(","))
        origin = 0.0 if names & _DURATION_IS_END_TIME else (container.start_time or 0) / 1e6
        seconds = container.duration / 1e6 - (start - origin)
    return seconds if seconds is not None and seconds > 0 else None


def _clock_may_jump(container: Any) -> bool:
    """Whether `container`'s format lets timestamps jump (AVFMT_TS_DISCONT: MPEG-TS, MPEG-PS), where a frame far
    before the previous one starts a new clock rather than being reordered."""
    return bool(int(getattr(container.format, "flags", 0) or 0) & _TS_DISCONT)


def decode_video(path: VideoInput, fps: float = 1.0, max_frames: int = 8, max_seconds: Optional[float] = None,
                 max_pixels: Optional[int] = None) -> list[Image.Image]:
    """Decode the frames shown at t = 0, 1/fps, 2/fps, ... (by timestamp), at most `max_frames`, uniformly spread.

    Time runs from the video's first frame: a video starting late on its file's clock (a cut kept on the source's
    timestamps, a live recording, audio muxed first) gives the frames the same clip starting at 0 gives. It runs
    until the last frame's start, and on while that frame stays on screen longer than a step (`_timeline_length`: a
    slideshow's last slide is sampled for as long as the others). Timestamps that jump back (MPEG-TS clips joined end
    to end, each on its own clock) continue the timeline after the frame before the jump, as FFmpeg plays them.

    At most `max_frames` frames are converted and held. When the header (frame count or duration, and rate)
    predicts the number of instants, one decoding pass suffices; otherwise a first pass reads only timestamps and a
    second converts the chosen frames. Frames are turned upright by their display matrix, and transparency is
    composited onto white (`frame_to_image`). Every decoded frame's size is checked, not only the header's: a
    stream may change size midway.
    A file is truncated when it decodes under 90% of the frames its header lists (at most its length times its
    rate: an MP4 cut by stream copy counts the pre-roll samples before the cut, which its edit list hides), or, with
    no frame count (Matroska/WebM), ends (its last frame's end) before 90% of the length its header lists (both from
    the video's start); a file whose header lists neither (a fragmented MP4, a live-recorded WebM) cannot be checked
    and is accepted.
    Args:
        path: a file path, the file's bytes, or a binary file object.
        fps: sampling rate in frames per second of video time.
        max_frames: cap; longer samplings are sub-sampled uniformly.
        max_seconds: refuse a longer video (by its header's length from its first frame, else when decoding passes
            it): decoding time grows with the length even though memory does not (a server's bound).
        max_pixels: refuse a video with a frame of more pixels, by its header and by every decoded frame (a
            server's bound: a stream whose header says 32x32 may switch to 16k x 16k frames); the frames opening
            it and reading its frames decode are capped by it too (`open_container`: a frame far over it is
            refused by its decoder, named by the size the decoder read where it read one, `_frames`).
    Returns:
        the sampled frames, in time order, as upright RGB PIL images; a frame repeats across a gap in the video.
    Raises:
        ValueError (naming the file) when the file is missing, truncated, in a container not read here
        (`open_container`), has no video stream, cannot be decoded or
        has a frame an image of its size would be refused for (`check_image_size`) or over `max_pixels`
        (`TooManyPixels`);
        ImportError when PyAV is not installed (not a bad file: a data loader that skips bad files must not skip it).
    """
    av = import_av()
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"decode_video needs fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}")
    name = _describe(path)
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise ValueError(f"video file not found: {name}")
    # Decoded in `_decode`; an error leaves it without its traceback: the traceback's frames hold PyAV frames
    # (whose converters own FFmpeg thread pools), kept in a reference cycle until a garbage collection, which in a
    # process forked meanwhile (a DataLoader worker) would wait for threads that are not there.
    error: Optional[ValueError] = None
    try:
        return _decode(av, path, name, 1.0 / fps, max_frames, max_seconds, max_pixels)
    except TooLong as e:
        error = TooLong(f"video {name} is {e}")
    except TooManyPixels as e:  # its class and fields kept: a caller names the cap's knob by them
        error = e.reworded(str(e))
    except av.error.FFmpegError as e:  # before ValueError: some are ValueErrors too (InvalidDataError)
        error = ValueError(f"cannot decode video {name}: {e}")
    except ValueError as e:
        error = ValueError(str(e))
    except Exception as e:  # PyAV raises other types too (IndexError on a cut header, ...)
        error = ValueError(f"cannot decode video {name}: {type(e).__name__}: {e}")
    raise error


def _decode(av: Any, path: VideoInput, name: str, step: float, max_frames: int, max_seconds: Optional[float],
            max_pixels: Optional[int]) -> list[Image.Image]:
    """`decode_video`'s work (its docstring), raising PyAV's errors as they come."""
    source = _opener(path)
    with open_container(av, source(), name, max_pixels) as container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {name}")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # a stream FFmpeg found but cannot open (an MP4 cut before its frames)
            raise ValueError(f"cannot decode video {name}: its video stream has no decoder (a file cut short, or a "
                             "codec this FFmpeg lacks)")
        # from the header, before any frame: a thin video would blow up in the image processor as an image
        width, height = stream.codec_context.width, stream.codec_context.height
        if max_pixels is not None and not (width and height):  # the size `open_container`'s cap left unread
            raise TooManyPixels(0, 0, None, max_pixels, f"video {name}: its frames are more than the {max_pixels} "
                                                        "pixels allowed, or of a size it does not give")
        _check_frame_size(name, width, height, max_pixels)
        expected = int(stream.frames or 0)
        seconds = _header_seconds(container, stream)
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        if expected and seconds and rate:  # an MP4 counts the samples its edit list hides (a stream-copied cut's
            expected = min(expected, round(seconds * rate))  # pre-roll): its length bounds the frames it shows
        if max_seconds is not None and seconds is not None and seconds > max_seconds:
            raise TooLong(f"{seconds:.1f} s long by its header, more than the {max_seconds:g} s allowed")
        predicted = _predicted_instants(expected, seconds, rate, step)
        guess = set(uniform_frame_indices(predicted, max_frames))
        start = _video_start(stream)
        jumps = _clock_may_jump(container)
        frames = _frames(av, container, name, max_pixels)
        images, instants, decoded, last_t, shown = _sample(frames, step, rate, guess, name, max_seconds=max_seconds,
                                                           max_pixels=max_pixels, seconds=seconds, clock_jumps=jumps)
    if not instants:
        raise ValueError(f"no frames decoded from video {name} (empty or truncated file)")
    if expected and decoded < _TRUNCATED_FRACTION * expected:
        raise ValueError(f"video {name} is truncated: decoded {decoded} of the {expected} frames its header lists")
    # from the video's start to its last frame's end (by the frame's own duration, else the average rate's)
    span = (last_t - start if last_t is not None else 0.0) + (shown or (1 / rate if rate else 0.0))
    if not expected and seconds and span < _TRUNCATED_FRACTION * seconds:
        raise ValueError(f"video {name} is truncated: decoded {span:.2f} s of the {seconds:.2f} s its header lists")
    chosen = uniform_frame_indices(instants, max_frames)
    images = {i: images[i] for i in chosen if i in images}
    if len(images) < len(chosen):  # the header did not predict the timeline: decode again for the rest
        with open_container(av, source(), name, max_pixels) as container:
            missing = set(chosen) - images.keys()
            images |= _sample(_frames(av, container, name, max_pixels), step, rate, missing, name, True,
                              max_pixels=max_pixels, seconds=seconds, clock_jumps=jumps)[0]
    return [images[i] for i in chosen]


def _frames(av: Any, container: "av.container.InputContainer", name: str,
            max_pixels: Optional[int]) -> Iterator["av.VideoFrame"]:
    """The first video stream's decoded frames. Under `max_pixels` its decoder refuses a frame far over it
    (`open_container`) as FFmpeg's decoders refuse bad data, with the same error: a `TooManyPixels` naming the size
    the decoder then holds where that is over the cap (H.264's new sequence header sets it before the frame is
    refused), else one of an unknown size (0x0) naming both causes."""
    context = container.streams.video[0].codec_context
    try:
        yield from container.decode(container.streams.video[0])
        return
    except av.error.FFmpegError as e:
        if max_pixels is None:
            raise
        width, height = context.width, context.height
        if width * height > max_pixels:
            error: ValueError = TooManyPixels(width, height, None, max_pixels, f"cannot decode video {name}: a "
                                              f"{width}x{height} frame is more than the {max_pixels} pixels allowed "
                                              f"(its decoder refused it: {e})")
        else:  # a size under the cap is the previous frames': FFmpeg tells no more
            error = TooManyPixels(0, 0, None, max_pixels, f"cannot decode video {name}: a frame of bad data or more "
                                                          f"than the {max_pixels} pixels allowed ({e})")
    raise error  # (outside the handler: no traceback kept, as `decode_video` keeps none)


# An animation frame's delay under this is shown for `_DEFAULT_DELAY` instead, as FFmpeg's GIF demuxer and browsers
# show it (old encoders wrote 0 or 10 ms for "as fast as you can").
_MIN_DELAY, _DEFAULT_DELAY = 0.02, 0.1


def animation_timeline(delays: Iterable[Optional[float]], fps: float = 1.0, max_frames: int = 8,
                       max_seconds: Optional[float] = None) -> list[int]:
    """An animation's frame delays (seconds each frame is shown, None when unknown; read lazily) -> the index of
    the frame shown at t = 0, 1/fps, 2/fps, ... while it plays (once), at most `max_frames` instants, uniformly spread.

    The rule of `decode_video` over an animation's own clock: instant t shows the last frame starting at or before
    t; the animation lasts until its last frame's delay ends (`decode_video` counts a last frame shown no longer
    than a step at its start only: `_timeline_length`). Raises `TooLong` once the delays pass `max_seconds`
    (no further delay is read).
    """
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"an animation needs fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}")
    starts, end = [], 0.0
    for delay in delays:
        starts.append(end)
        end += delay if delay is not None and delay >= _MIN_DELAY else _DEFAULT_DELAY
        if max_seconds is not None and end > max_seconds:
            raise TooLong(f"longer than the {max_seconds:g} s allowed")
    if not starts:
        raise ValueError("an animation with no frames")
    step = 1.0 / fps
    instants = max(1, math.ceil(end / step - _TIME_TOLERANCE))  # t = j * step < end
    return [bisect.bisect_right(starts, j * step + _TIME_TOLERANCE) - 1
            for j in uniform_frame_indices(instants, max_frames)]
