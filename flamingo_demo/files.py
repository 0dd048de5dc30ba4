"""Files of the mini world: a random stream per dataset, images, videos, JSON."""

from __future__ import annotations

import json
import os
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from flamingo.video import import_av

PathLike = Union[str, os.PathLike]


def stream(seed: int, name: str) -> np.random.Generator:
    """An independent random stream per dataset, so that resizing one dataset leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def save_image(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def save_video(frames: np.ndarray, path: Path, fps: float = 1.0) -> None:
    """(F, H, W, 3) uint8 -> mp4 (libx264 when available, else mpeg4; yuv420p, so H and W must be even)."""
    av = import_av()  # only the video writers need PyAV
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be (F, H, W, 3) with even H, W, got {frames.shape}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"} if codec == "libx264" else {"qscale": "2"}
        stream.codec_context.thread_count = 1  # deterministic bytes
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_json(obj: Any, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def write_jsonl(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
