"""`LRU`: the one bounded least-recently-used store of the package, and `TensorCache`, its byte-budgeted form for
tensors.

Users: open tar shards (by count, closed on eviction), evaluation media (by bytes), preprocessed training media and
frozen-tower features (`TensorCache`, by bytes). Every store pickles empty: a copy sent to a worker process starts
cold instead of shipping its contents.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Optional, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def budget_bytes(mib: float, what: str) -> int:
    """A cache size in MiB as bytes: 0 for 0 (the cache off), at least 1 byte for any size > 0; a size that is not a
    finite number >= 0 is refused, naming `what` (an infinite size would never evict, NaN would turn it off)."""
    if not isinstance(mib, (int, float)) or not math.isfinite(mib) or mib < 0:
        raise ValueError(f"{what} needs a size that is a finite number >= 0 MiB, got {mib}")
    return max(1, math.ceil(mib * 2**20)) if mib > 0 else 0


# Every store of this process: a child forked while another thread of the parent held a store's lock would find it
# held for good (the child has one thread), so each store gets a fresh lock there
_STORES: "weakref.WeakSet[LRU]" = weakref.WeakSet()


def _fresh_locks_after_fork() -> None:
    for store in list(_STORES):
        store._lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # (no fork on Windows)
    os.register_at_fork(after_in_child=_fresh_locks_after_fork)


class LRU(Generic[K, V]):
    """Items under a budget of `max_size` units (`size_of(value)`, 1 by default: a count). The least recently used
    items leave first; `on_evict(value)` runs for each one that leaves, a value replaced under its key included. An
    item larger than the whole budget is not stored."""

    def __init__(self, max_size: int, size_of: Optional[Callable[[Any], int]] = None,
                 on_evict: Optional[Callable[[Any], None]] = None) -> None:
        if max_size <= 0:
            raise ValueError(f"an LRU store needs a positive budget, got {max_size}")
        self.max_size = int(max_size)
        self.size_of = size_of
        self.on_evict = on_evict
        self.size = 0
        self.hits = 0
        self._items: OrderedDict[K, V] = OrderedDict()
        # one caller at a time (callers on several threads: a model's vision cache shared by an app's threads); an
        # `on_evict` may use the store again
        self._lock = threading.RLock()
        _STORES.add(self)

    def _size(self, value: V) -> int:
        return 1 if self.size_of is None else self.size_of(value)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def peek(self, key: K) -> Optional[V]:
        """The value without touching it (nor counting a hit)."""
        return self._items.get(key)

    def get(self, key: K) -> Optional[V]:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: K, value: V) -> None:
        """Store `value` under `key`. A value already there leaves (`on_evict` runs for it, unless it is `value`
        itself), also when `value` is too large to store: the key never keeps a stale value."""
        with self._lock:
            self._put(key, value)

    def _put(self, key: K, value: V) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            if old is value:
                self.size -= self._size(old)
            else:
                self._leave(old)
        size = self._size(value)
        if size > self.max_size:
            return
        self._items[key] = value
        self.size += size
        while self.size > self.max_size:
            _, evicted = self._items.popitem(last=False)
            self._leave(evicted)

    def clear(self) -> None:
        """Every item leaves, least recently used first (`on_evict` runs for each)."""
        with self._lock:
            while self._items:
                _, value = self._items.popitem(last=False)
                self._leave(value)

    def _leave(self, value: V) -> None:
        self.size -= self._size(value)
        if self.on_evict is not None:
            self.on_evict(value)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_size": self.max_size, "size_of": self.size_of, "on_evict": self.on_evict}

    def __setstate__(self, state: dict[str, Any]) -> None:
        LRU.__init__(self, state["max_size"], state["size_of"], state["on_evict"])


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TensorCache(LRU[Hashable, torch.Tensor]):
    """Tensors under a byte budget. A stored view is copied first, so a row of a batch does not keep the batch alive.

    Used for work a many-epoch run would otherwise repeat: preprocessed `(F, C, H, W)` media by file and frame
    sampling (`options.cache_media_mib`; preprocessing is deterministic, so a hit returns exactly what a miss
    computes) and a frozen tower's features by frame content (`VisionFeatureCache`). See docs/data.md for what they
    save on the demo's world.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"a tensor cache needs a positive budget, got {max_bytes} bytes")
        super().__init__(max_bytes, size_of=nbytes)

    @property
    def max_bytes(self) -> int:
        return self.max_size

    @property
    def bytes(self) -> int:
        return self.size

    @classmethod
    def of_mib(cls, mib: float) -> Optional["TensorCache"]:
        """A cache of `mib` MiB, or None for 0 (off)."""
        size = budget_bytes(mib, "a tensor cache")
        return cls(size) if size else None

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        value = value.detach()
        if nbytes(value) <= self.max_size and value.untyped_storage().nbytes() > nbytes(value):
            value = value.clone()
        super().put(key, value)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        TensorCache.__init__(self, state["max_bytes"])
