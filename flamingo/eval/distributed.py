"""Distributed evaluation under torchrun: samples strided across ranks, predictions gathered before the metric.

Rank r evaluates samples r, r + W, r + 2W, ... (W = WORLD_SIZE), so shards differ by at most one sample and nothing
is padded: `all_gather_object` carries lists of any length, and `gather_by_index` checks that every sample index
arrives exactly once. A single process (no RANK/WORLD_SIZE) needs nothing; the process group is joined by
`flamingo.runtime.init_process_group_from_env`.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def shard(n: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The sample indices this rank evaluates (strided)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(range(rank_, n, world))


def gather_by_index(parts: Sequence[Sequence[tuple[int, T]]], n: int) -> list[T]:
    """Per-rank lists of (sample index, item) -> the n items in index order; each index exactly once."""
    merged: dict[int, T] = {}
    for part in parts:
        for index, item in part:
            if index in merged:
                raise RuntimeError(f"sample {index} was evaluated twice")
            merged[index] = item
    missing = [i for i in range(n) if i not in merged]
    if missing or len(merged) != n:
        raise RuntimeError(f"{len(missing)} sample(s) missing after gathering, e.g. {missing[:5]}")
    return [merged[i] for i in range(n)]


def all_gather(local: Sequence[tuple[int, T]], n: int) -> list[T]:
    """This rank's (index, item) pairs -> every rank's items in index order (on every rank)."""
    if not _active():
        return gather_by_index([local], n)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(local))
    return gather_by_index(parts, n)


def broadcast(obj: T) -> T:
    """Rank 0's object on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
