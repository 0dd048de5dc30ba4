"""Streams: which raw records a (rank, worker) reads in an epoch, in which order, and the batches they make.

A dataset of `world_size` ranks x `S` streams per rank has `G = world_size * S` global streams; stream `g` reads
- whole files `files[g::G]` (after a per-epoch shuffle of the file list) when there are at least G files,
- otherwise every file, keeping the records whose running index `i` has `i % G == g` (one JSONL/CSV file is split
  by line index), so streams are disjoint and together cover the dataset.
Each stream shuffles its records with a buffer seeded by (seed, epoch, g). Everything is a pure function of
(files, seed, epoch, g, G): a stream can be replayed, and a resume skips the first `pos` raw records without decoding
them (a raw record is a text line, a CSV row or a tar member index).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from .errors import BadFractionGuard, SkipSample
from .remote import ShardFetcher, is_remote
from .sequence import collate
from .sources import RawRecord, close_open_shards, read_records
from .spec import DatasetSpec


def epoch_rng(seed: int, epoch: int, stream: Optional[int] = None) -> random.Random:
    # String seeds hash with SHA-512: the same on every machine, independent of PYTHONHASHSEED.
    return random.Random(f"flamingo-data/{seed}/{epoch}/{'files' if stream is None else stream}")


def _read_in_turn(paths: list[str], tar_needs: Optional[str], fetcher: Optional[ShardFetcher]
                  ) -> Iterator[RawRecord]:
    """The records of `paths` in order; while one is read, the next remote shard is fetched in the background."""
    for i, path in enumerate(paths):
        if fetcher is not None and i + 1 < len(paths) and is_remote(paths[i + 1]):
            fetcher.prefetch(paths[i + 1])
        yield from read_records(path, tar_needs, fetcher)


def stream_records(files: list[str], *, epoch: int, seed: int, stream: int, num_streams: int,
                   shuffle: bool = True, tar_needs: Optional[str] = None,
                   fetcher: Optional[ShardFetcher] = None) -> Iterator[RawRecord]:
    """The raw records of global stream `stream` of `num_streams` in this epoch, before the shuffle buffer.
    `fetcher`: where remote shards are fetched to (data/remote.py)."""
    if not 0 <= stream < num_streams:
        raise ValueError(f"stream {stream} out of range for {num_streams} streams")
    order = list(files)
    if shuffle:
        epoch_rng(seed, epoch).shuffle(order)
    if len(order) >= num_streams:
        yield from _read_in_turn(order[stream::num_streams], tar_needs, fetcher)
        return
    index = 0
    for record in _read_in_turn(order, tar_needs, fetcher):
        if index % num_streams == stream:
            yield record
        index += 1


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Classic streaming shuffle: keep `size` items, emit a random one as each new item arrives."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class StreamItem:
    """What a stream hands to its `DatasetSource`: a batch (None for the end marker) and the stream's position."""

    stream: int  # local stream index (= DataLoader worker id)
    pos: int  # raw records consumed by this stream in this epoch, up to and including this batch
    samples: int  # good samples batched so far this epoch
    skipped: dict[str, int] = field(default_factory=dict)  # skips so far this epoch, by reason
    batch: Optional[dict[str, Any]] = None  # None: the stream is exhausted


def iterate_stream(spec: DatasetSpec, *, epoch: int, seed: int, stream: int, local_stream: int, num_streams: int,
                   start: int = 0, samples: int = 0, skipped: Optional[dict[str, int]] = None
                   ) -> Iterator[StreamItem]:
    """Batches of one global stream, resuming after `start` raw records; ends with an end marker (batch None).
    When its records end (or it stops early) this process's open tar shards are closed (`close_open_shards`)."""
    o = spec.options
    records = stream_records(spec.files, epoch=epoch, seed=seed, stream=stream, num_streams=num_streams,
                             shuffle=bool(o["shuffle"]), tar_needs=spec.tar_needs,
                             fetcher=spec.fetcher)
    if o["shuffle"]:
        records = shuffle_buffer(records, int(o["shuffle_buffer"]), epoch_rng(seed, epoch, stream))
    counts: Counter[str] = Counter(skipped or {})
    guard = BadFractionGuard(float(o["max_bad_fraction"]), int(o["min_samples_for_bad_check"]))
    pending = []
    pos = 0
    try:
        for record in records:
            pos += 1
            if pos <= start:  # consumed before the checkpoint: skipped without parsing or decoding
                continue
            try:
                record.check()
                sample = spec.encode(record)
            except SkipSample as e:
                counts[e.reason] += 1
                guard.skip(record.file, e.reason)
                continue
            guard.good(record.file)
            pending.append(sample)
            if len(pending) == spec.batch_size:
                samples += len(pending)
                yield StreamItem(local_stream, pos, samples, dict(counts), collate(pending, spec.processor,
                                                                                  o["padding_side"], o["pack_tokens"]))
                pending = []
    finally:
        close_open_shards()
    if pending and not o["drop_last"]:
        samples += len(pending)
        yield StreamItem(local_stream, pos, samples, dict(counts), collate(pending, spec.processor,
                                                                          o["padding_side"], o["pack_tokens"]))
    yield StreamItem(local_stream, pos, samples, dict(counts), None)
