"""Video decoding with PyAV: frames sampled at a fixed rate by timestamp, then uniformly capped at `max_frames`.

The paper samples training and evaluation videos at 1 FPS; a clip longer than the model's learned time embeddings
(`max_frames`) is sub-sampled uniformly (`uniform_frame_indices`, which the processor uses for frame lists too).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

from PIL import Image

VideoInput = Union[str, "os.PathLike[str]", bytes, BinaryIO]

# A clip whose header promises N frames but decodes to fewer than this fraction of them is treated as truncated.
_TRUNCATED_FRACTION = 0.9


def uniform_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Indices of at most `max_frames` frames spread uniformly over a clip of `num_frames` (all if it is short)."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [int((i + 0.5) * num_frames / max_frames) for i in range(max_frames)]


def _describe(path: VideoInput) -> str:
    if isinstance(path, (str, os.PathLike)):
        return repr(os.fspath(path))
    return repr(getattr(path, "name", "<in-memory video>"))


def decode_video(path: VideoInput, fps: float = 1.0, max_frames: int = 8) -> list[Image.Image]:
    """Decode a video into RGB frames taken every `1 / fps` seconds, at most `max_frames` (uniformly spread).

    Args:
        path: a file path, the file's bytes, or a binary file object.
        fps: sampling rate in frames per second of video time (the frame shown at t = 0, 1/fps, 2/fps, ...).
        max_frames: cap; longer samplings are sub-sampled uniformly.
    Returns:
        the sampled frames, in time order, as RGB PIL images.
    Raises:
        ValueError (naming the file) when the file is missing, truncated, has no video stream or cannot be decoded.
    """
    import av  # imported lazily: only videos need PyAV

    if fps <= 0 or max_frames < 1:
        raise ValueError(f"decode_video needs fps > 0 and max_frames >= 1, got fps={fps}, max_frames={max_frames}")
    name = _describe(path)
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise ValueError(f"video file not found: {name}")
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    step = 1.0 / fps
    frames: list[Image.Image] = []
    decoded = 0
    try:
        with av.open(source) as container:  # type: ignore[arg-type]
            if not container.streams.video:
                raise ValueError(f"no video stream in {name}")
            stream = container.streams.video[0]
            expected = int(stream.frames or 0)
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            start: float | None = None
            next_time = 0.0
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else (decoded / rate if rate else float(decoded))
                decoded += 1
                if start is None:
                    start = t
                t -= start
                # Take this frame for every sampling instant it is the first frame at or after (once).
                if t + 1e-6 >= next_time:
                    frames.append(frame.to_image().convert("RGB"))
                    while next_time <= t + 1e-6:
                        next_time += step
    except av.error.FFmpegError as e:  # before ValueError: some are ValueErrors too (InvalidDataError)
        raise ValueError(f"cannot decode video {name}: {e}") from e
    except ValueError:
        raise
    except Exception as e:  # PyAV raises other types too (IndexError on a cut header, ...)
        raise ValueError(f"cannot decode video {name}: {type(e).__name__}: {e}") from e
    if not frames:
        raise ValueError(f"no frames decoded from video {name} (empty or truncated file)")
    if expected and decoded < _TRUNCATED_FRACTION * expected:
        raise ValueError(f"video {name} is truncated: decoded {decoded} of the {expected} frames its header lists")
    return [frames[i] for i in uniform_frame_indices(len(frames), max_frames)]
