"""Bad input never stops a run: a bad sample is skipped and counted by reason, until a file is mostly bad."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

# Why a sample can be skipped (docs/data.md lists them with examples).
REASONS = (
    "bad_json",  # a JSONL line / tar .json member that does not parse, or is not an object
    "bad_record",  # parses, but lacks required fields or has the wrong types / shapes
    "missing_file",  # a referenced image / video file (or tar member) does not exist
    "bad_image",  # image bytes PIL cannot decode, or in a format not read (runtime/media_formats.py)
    "bad_video",  # a truncated or undecodable video, or in a container not read (runtime/media_formats.py)
    "empty_text",  # no caption / all sentences empty / a conversation with no answer (left within max_tokens)
    "no_matched_image",  # interleaved: no image matched a sentence above the similarity threshold
    "bad_shard",  # a tar shard that cannot be read (to the end)
    "duplicate_key",  # a tar key that comes again after its first sample (the first is read, each later skipped)
)


class SkipSample(Exception):
    """Raised by sample builders: this sample is skipped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def merge_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return {k: v for k, v in sorted(total.items()) if v}


class BadFractionGuard:
    """Counts good / bad samples per file and raises once a file is mostly bad.

    The check starts once `min_samples` samples of a file were read by this stream, so a few corrupt samples in a
    small file are skips, never an abort.
    """

    def __init__(self, max_bad_fraction: float = 0.5, min_samples: int = 10) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.seen: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()
        self.reasons: dict[str, Counter[str]] = {}

    def good(self, file: str) -> None:
        self.seen[file] += 1
        if self.seen[file] == self.min_samples:  # the check starts here too: bad samples may all come before
            self.check(file)

    def skip(self, file: str, reason: str) -> None:
        self.seen[file] += 1
        self.bad[file] += 1
        self.reasons.setdefault(file, Counter())[reason] += 1
        if self.seen[file] >= self.min_samples:
            self.check(file)

    def check(self, file: str) -> None:
        seen, bad = self.seen[file], self.bad[file]
        if seen and bad / seen > self.max_bad_fraction:
            reasons = dict(self.reasons.get(file, {}))
            raise ValueError(f"{bad} of {seen} samples read from {file!r} were bad {reasons}: more than "
                             f"max_bad_fraction={self.max_bad_fraction}; fix or remove this file (or raise the "
                             "dataset option max_bad_fraction)")
