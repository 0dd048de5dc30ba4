"""What the demo's growing stages share: reading a corpus, resolving a size, the learning-rate schedule, words."""

from __future__ import annotations

import math
import os
import re
from typing import Sequence, Union

import numpy as np

from .sizes import DEFAULT_SIZE, MiniSize, get_size

PathLike = Union[str, os.PathLike]
Pairs = Union[PathLike, Sequence[tuple[np.ndarray, str]]]


EOS = "<|endoftext|>"


def corpus_lines(corpus: Union[PathLike, Sequence[str]]) -> list[str]:
    if isinstance(corpus, (str, os.PathLike)):
        with open(corpus) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    return [str(line) for line in corpus]


def resolve_size(size: Union[str, MiniSize, None]) -> MiniSize:
    if size is None:
        return get_size(DEFAULT_SIZE)
    return get_size(size) if isinstance(size, str) else size


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.1, schedule: str = "cosine") -> float:
    """Linear warmup, then cosine decay to 10% of the peak (`cosine`) or the peak to the end (`constant`)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose 'cosine' or 'constant'")
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))



def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())
