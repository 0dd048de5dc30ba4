"""The dataset kinds and their options with defaults (docs/data.md): plain data, so that the CLI lists them without
importing the loaders."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from ..runtime.warn import warn_outside
from .remote import DEFAULT_CACHE_GB

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
    "cache_media_mib": 0.0,  # MiB of preprocessed media kept for later epochs (a TensorCache, runtime/lru.py)
    "pack_tokens": 0,  # > 0: pack each batch's samples into rows of up to this many tokens (sequence.collate)
    "remote_cache_dir": None,  # where remote shards are fetched to; None: data/remote.py default_cache_dir()
    "remote_cache_gb": DEFAULT_CACHE_GB,  # the most GiB of fetched shards kept there (least recently used leave)
}
KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "interleaved": {"max_images": 5, "max_tokens": 256, "similarity_threshold": 0.24, "image_dir": None},
    "pairs": {"max_tokens": 32},
    "video": {"max_tokens": 32, "fps": None, "max_frames": None},  # None: the processor's video_fps, max_frames
    # conversations end with the format's end-of-answer marker, which generation stops at: no EOS after it.
    # text_only: keep conversations without any medium (language-only instruction data, as Multimodal-GPT mixes in)
    "chat": {"max_tokens": 512, "fps": None, "max_frames": None, "append_eos": False, "text_only": False},
}


# options read under an earlier name (MiB spelled _mb): the new name -> the old one (`renamed_keys`)
RENAMED_OPTIONS = {"cache_media_mib": "cache_media_mb"}


def renamed_keys(values: dict[str, Any], renames: dict[str, str], where: str) -> dict[str, Any]:
    """`values` with each earlier name in `renames` (new -> old) read as the new one, said by a FutureWarning (by
    rank 0 alone under torchrun: every rank reads the config); both names given are refused, one setting twice. `where`
    prefixes the names in messages (`train.`, `option `)."""
    out = dict(values)
    for new, old in renames.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"{where}{old} and {new} are one setting ({new} is its name now): give {new} only")
        out[new] = out.pop(old)
        if int(os.environ.get("RANK", 0)) == 0:
            warn_outside(f"{where}{old} is now spelled {new} (the same MiB): rename it; the old name is still read",
                         FutureWarning)
    return out


# the type of the options whose default is None
NULLABLE_TYPES: dict[str, type] = {"fps": float, "max_frames": int, "remote_cache_dir": str, "image_dir": str}


def _check_type(name: str, value: Any, default: Any) -> None:
    """An option's value has its default's type (a quoted "false" would read as true; "8" fails deep in a loader)."""
    wanted = NULLABLE_TYPES.get(name, str) if default is None else type(default)
    if default is None and value is None:
        return
    if wanted is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif wanted is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif wanted is float:
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, what = isinstance(value, wanted), "a string"
    if not ok:
        raise ValueError(f"option {name} must be {what}{' or null' if default is None else ''}, got {value!r}")


def resolve_options(kind: str, options: Optional[dict[str, Any]]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
    defaults = {**COMMON_OPTIONS, **KIND_OPTIONS[kind]}
    options = renamed_keys(options or {}, RENAMED_OPTIONS, "option ")
    unknown = set(options or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for a {kind!r} dataset; known: {sorted(defaults)}")
    for name, value in (options or {}).items():
        _check_type(name, value, defaults[name])
    resolved = {**defaults, **(options or {})}
    if resolved["padding_side"] not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {resolved['padding_side']!r}")
    if int(resolved["max_tokens"]) < 2:
        raise ValueError(f"max_tokens must be >= 2 (an <image> and some text), got {resolved['max_tokens']}")
    # zero or negative values would skip every sample (blaming the data) or cut a document's last image unseen
    if "max_images" in resolved and int(resolved["max_images"]) < 1:
        raise ValueError(f"max_images must be >= 1, got {resolved['max_images']}")
    if resolved.get("fps") is not None and not 0 < float(resolved["fps"]) < float("inf"):
        raise ValueError(f"fps must be a number > 0 (null: the processor's), got {resolved['fps']}")
    if resolved.get("max_frames") is not None and int(resolved["max_frames"]) < 1:
        raise ValueError(f"max_frames must be >= 1 (null: the processor's), got {resolved['max_frames']}")
    if int(resolved["pack_tokens"]) < 0:
        raise ValueError(f"pack_tokens must be >= 0 (0: one sample per row), got {resolved['pack_tokens']}")
    if int(resolved["pack_tokens"]) > 0 and resolved["padding_side"] != "right":
        raise ValueError("pack_tokens needs padding_side 'right' (packed rows are right-padded)")
    if not 0 <= float(resolved["cache_media_mib"]) < math.inf:  # NaN fails too
        raise ValueError(f"cache_media_mib must be a finite number >= 0 (0: off), got {resolved['cache_media_mib']}")
    if float(resolved["remote_cache_gb"]) <= 0:
        raise ValueError(f"remote_cache_gb must be > 0, got {resolved['remote_cache_gb']}")
    if not 0.0 <= float(resolved["max_bad_fraction"]) <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {resolved['max_bad_fraction']}")
    return resolved


def check_stream_options(name: str, options: dict[str, Any]) -> None:
    """Refuse stream options that would be read as another setting, unsaid: a negative `shuffle_buffer` (no buffer,
    as 0 and 1), a negative `min_samples_for_bad_check` (0: from the first sample), a `remote_cache_gb` that is no
    finite number (NaN passes a `<= 0` check, then sizes the cache)."""
    for key in ("shuffle_buffer", "min_samples_for_bad_check"):
        if int(options[key]) < 0:
            raise ValueError(f"dataset {name!r}: option {key} must be >= 0, got {options[key]}")
    if not 0 < float(options["remote_cache_gb"]) < math.inf:  # (NaN fails too)
        raise ValueError(f"dataset {name!r}: option remote_cache_gb must be a finite number > 0, got "
                         f"{options['remote_cache_gb']}")
