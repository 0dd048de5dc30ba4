"""A dataset's resolved settings (kind, files, options with defaults) and its record -> sample function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..chat import FLAMINGO, chat_format_for
from ..processing import FlamingoProcessor
from ..runtime.lru import TensorCache
from .chat import chat_example
from .interleaved import interleaved_example
from .pairs import pair_example
from .remote import DEFAULT_CACHE_GB, ShardFetcher, default_cache_dir, is_remote
from .sequence import Encoded, Example, encode_example
from .sources import RawRecord, expand_path

KINDS = ("interleaved", "pairs", "video", "chat")

# Options every kind takes (`DatasetSection.options`), with defaults.
COMMON_OPTIONS: dict[str, Any] = {
    "shuffle": True,  # shuffle shard order and samples (a buffer), seeded by (seed, epoch, stream)
    "shuffle_buffer": 1000,  # samples held by the shuffle buffer (raw records: cheap)
    "drop_last": True,  # drop each stream's last partial batch in an epoch (batches are exactly batch_size)
    "max_bad_fraction": 0.5,  # abort when more than this fraction of a file's samples are bad ...
    "min_samples_for_bad_check": 10,  # ... once this many of its samples were read (per stream)
    "padding_side": "right",
    "append_eos": True,  # end every sequence with the tokenizer's EOS (OpenFlamingo does)
    "cache_media_mb": 0,  # MiB of preprocessed media kept for later epochs (a TensorCache, runtime/lru.py)
    "pack_tokens": 0,  # > 0: pack each batch's samples into rows of up to this many tokens (sequence.collate)
    "remote_cache_dir": None,  # where remote shards are fetched to (data/remote.py); None: ~/.cache/flamingo/shards
    "remote_cache_gb": DEFAULT_CACHE_GB,  # the most GiB of fetched shards kept there (least recently used leave)
}
KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "interleaved": {"max_images": 5, "max_tokens": 256, "similarity_threshold": 0.24, "image_dir": None},
    "pairs": {"max_tokens": 32},
    "video": {"max_tokens": 32, "fps": 1.0, "max_frames": None},  # max_frames None: the processor's
    # conversations end with the format's end-of-answer marker, which generation stops at: no EOS after it
    "chat": {"max_tokens": 512, "fps": 1.0, "max_frames": None, "append_eos": False},
}


def resolve_options(kind: str, options: Optional[dict[str, Any]]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
    defaults = {**COMMON_OPTIONS, **KIND_OPTIONS[kind]}
    unknown = set(options or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for a {kind!r} dataset; known: {sorted(defaults)}")
    resolved = {**defaults, **(options or {})}
    if resolved["padding_side"] not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {resolved['padding_side']!r}")
    if int(resolved["max_tokens"]) < 2:
        raise ValueError(f"max_tokens must be >= 2 (an <image> and some text), got {resolved['max_tokens']}")
    if int(resolved["pack_tokens"]) < 0:
        raise ValueError(f"pack_tokens must be >= 0 (0: one sample per row), got {resolved['pack_tokens']}")
    if int(resolved["pack_tokens"]) > 0 and resolved["padding_side"] != "right":
        raise ValueError("pack_tokens needs padding_side 'right' (packed rows are right-padded)")
    if float(resolved["cache_media_mb"]) < 0:
        raise ValueError(f"cache_media_mb must be >= 0 (0: off), got {resolved['cache_media_mb']}")
    if float(resolved["remote_cache_gb"]) <= 0:
        raise ValueError(f"remote_cache_gb must be > 0, got {resolved['remote_cache_gb']}")
    if not 0.0 <= float(resolved["max_bad_fraction"]) <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {resolved['max_bad_fraction']}")
    return resolved


@dataclass
class DatasetSpec:
    """Everything a stream needs to turn raw records into samples: picklable (sent to DataLoader workers)."""

    name: str
    kind: str
    files: list[str]
    batch_size: int
    options: dict[str, Any]
    processor: Optional[FlamingoProcessor]  # None: inspect without a tokenizer (no tokens, no pixels)
    media_cache: Optional[TensorCache] = None  # options.cache_media_mb > 0; pickles empty (one per worker process)
    fetcher: Optional[ShardFetcher] = None  # remote shards' cache (options.remote_cache_*); None: no remote files

    @classmethod
    def create(cls, name: str, kind: str, path: str, batch_size: int, options: Optional[dict[str, Any]],
               processor: Optional[FlamingoProcessor]) -> "DatasetSpec":
        if batch_size < 1:
            raise ValueError(f"dataset {name!r}: batch_size must be >= 1, got {batch_size}")
        resolved = resolve_options(kind, options)
        if kind in ("video", "chat") and resolved["max_frames"] is None:
            resolved["max_frames"] = processor.max_frames if processor is not None else 8
        cache = TensorCache.of_mib(float(resolved["cache_media_mb"])) if processor is not None else None
        files = expand_path(path)
        fetcher = None
        if any(is_remote(f) for f in files):
            fetcher = ShardFetcher(resolved["remote_cache_dir"] or default_cache_dir(),
                                   int(float(resolved["remote_cache_gb"]) * 2**30))
        return cls(name, kind, files, batch_size, resolved, processor, cache, fetcher)

    @property
    def tar_needs(self) -> Optional[str]:
        """The member a tar sample of this kind must have (`read_records`): documents and conversations are JSON."""
        return "json" if self.kind in ("interleaved", "chat") else None

    @property
    def eos(self) -> str:
        if self.processor is None or not self.options["append_eos"]:
            return ""
        return self.processor.tokenizer.eos_token or ""

    def example(self, record: RawRecord) -> Example:
        """Parse a record (no media decoded); raises SkipSample."""
        o = self.options
        if self.kind == "interleaved":
            return interleaved_example(record, similarity_threshold=float(o["similarity_threshold"]),
                                       max_images=int(o["max_images"]), image_dir=o["image_dir"], eos=self.eos)
        if self.kind == "chat":  # written as the model is served (its processor's template)
            return chat_example(record, FLAMINGO if self.processor is None else chat_format_for(self.processor),
                                eos=self.eos)
        return pair_example(record, video=self.kind == "video", eos=self.eos)

    def encode(self, record: RawRecord) -> Encoded:
        """Parse, tokenize, truncate, load and preprocess media; raises SkipSample."""
        assert self.processor is not None, "encoding needs a processor"
        o = self.options
        return encode_example(self.example(record), self.processor, max_tokens=int(o["max_tokens"]),
                              fps=float(o.get("fps", 1.0)), max_frames=int(o.get("max_frames") or 8),
                              cache=self.media_cache)
