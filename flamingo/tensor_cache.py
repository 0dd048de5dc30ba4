"""`TensorCache`: a bounded in-memory LRU of tensors, for work that a many-epoch run would otherwise repeat.

Two users, both off by default:
- the data layer (`options.cache_media_mb`): preprocessed `(F, C, H, W)` pixels of a medium, keyed by its file (path,
  or tar shard + member) and frame sampling. Preprocessing is deterministic (HF image processors, fixed frame
  sampling), so a hit returns exactly what a miss computes: batches are bit-identical with and without it. Inline
  (base64) media have no stable name and are never cached; failed reads raise SkipSample before reaching it. It lives
  in the process that decodes: with `train.num_workers > 0` each DataLoader worker keeps its own for one epoch
  (workers restart every epoch), so it pays off with in-process loading (`num_workers: 0`).
- the model (`VisionFeatureCache`, `train.cache_vision_features_mb`): a frozen tower's features by frame content.

A small world trained for many epochs (the mini world of `flamingo demo`: its clips ~13 times, its documents ~7 times)
spends ~20% of a step decoding the same PNGs and MP4s and ~11% running the frozen tower on them again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Optional

import torch


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TensorCache:
    """LRU of tensors under a byte budget. Pickles empty: a copy sent to a worker process starts cold."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"a tensor cache needs a positive budget, got {max_bytes} bytes")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    @classmethod
    def of_mib(cls, mib: float) -> Optional["TensorCache"]:
        """A cache of `mib` MiB, or None for 0 (off)."""
        if mib < 0:
            raise ValueError(f"a cache size must be >= 0 MiB, got {mib}")
        return cls(int(mib * 2**20)) if mib > 0 else None

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        value = self._items.get(key)
        if value is None:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= nbytes(old)
        # A view into a larger tensor (a row of a batch) would keep all of it alive: store a compact copy.
        value = value.detach()
        if value.untyped_storage().nbytes() > size:
            value = value.clone()
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= nbytes(evicted)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])
