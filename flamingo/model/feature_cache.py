"""`VisionFeatureCache`: a frozen vision tower's features, remembered by frame content across calls.

The tower is frozen and in eval mode during Flamingo training, so a frame's features depend on its pixels only: a run
that sees its images many times (a small dataset, many epochs) can compute each frame once. The key is a BLAKE2b
digest of the frame's pixel bytes (plus dtype and shape), so the cache needs no help from the data pipeline and cannot
return the features of a different image; augmented pixels simply miss. The caller owns the cache and hands it to
`Flamingo.forward(..., vision_cache=)` per call: nothing is stored on the model.

Cached features were computed in another batch, so they can differ from a fresh computation in the last bits (CPU
matmuls block by batch size): training with the cache is deterministic run to run, equal to training without it up to
float rounding. Hashing reads the pixels on the host: on an accelerator that is a device-to-host copy per step.

A server shares one cache between clients; `salted` gives the view a request with a `cache_salt` uses: the same store,
keys made under the salt (a keyed BLAKE2b), so an entry is found only by requests with the salt it was made under and
one client cannot learn from the cache whether another sent an image.
What it saves on a many-epoch run: docs/data.md, "Measurements behind the defaults".
"""

from __future__ import annotations

import copy
import hashlib
from typing import Callable, Optional

import torch

from ..runtime.lru import TensorCache, budget_bytes


def salt_key(salt: str) -> bytes:
    """A cache salt (any non-empty string) as a BLAKE2b key: 32 bytes, personalised so that no salt's key is a
    digest the caches make of their contents."""
    return hashlib.blake2b(salt.encode(), digest_size=32, person=b"flamingo-salt").digest()


class VisionFeatureCache:
    """Memo of `tower(pixels)` rows, `(C, H, W)` frame -> `(S, Dv)` features, under a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.store = TensorCache(max_bytes)
        self.salt = b""  # the BLAKE2b key of every entry's digest (`salted`); b"": the shared default
        self._counts = [0, 0]  # frames asked for, and those the tower ran on (shared with the salted views)

    @property
    def frames(self) -> int:
        return self._counts[0]

    @property
    def computed(self) -> int:
        return self._counts[1]

    def salted(self, salt: Optional[str]) -> "VisionFeatureCache":
        """The cache as requests with `salt` see it: its store and counters, its entries keyed under the salt (None:
        the cache itself)."""
        if not salt:
            return self
        view = copy.copy(self)
        view.salt = salt_key(salt)
        return view

    @classmethod
    def of_mib(cls, mib: float) -> Optional["VisionFeatureCache"]:
        """A cache of `mib` MiB, or None for 0 (off)."""
        size = budget_bytes(mib, "a vision feature cache")
        return cls(size) if size else None

    @property
    def bytes(self) -> int:
        return self.store.bytes

    @staticmethod
    def key(frame: torch.Tensor, salt: bytes = b"") -> bytes:
        head = f"{frame.dtype}{tuple(frame.shape)}".encode()
        data = frame.contiguous().view(torch.uint8).numpy().tobytes()  # any dtype (numpy has no bfloat16)
        return hashlib.blake2b(head + data, digest_size=16, key=salt).digest()

    def encode(self, pixels: torch.Tensor, tower: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """pixels (K, C, H, W) -> features (K, S, Dv): the tower runs once, on the frames not seen before (a frame
        repeated within the call is computed once too)."""
        host = pixels.detach().to("cpu").contiguous()
        keys = [self.key(host[i], self.salt) for i in range(host.shape[0])]
        first: dict[bytes, int] = {}  # each distinct frame's first row
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        found = {k: self.store.get(k) for k in first}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            rows = torch.tensor([first[k] for k in missing], device=pixels.device)
            for k, row in zip(missing, tower(pixels.index_select(0, rows))):  # (M, S, Dv)
                found[k] = row
                self.store.put(k, row)
        self._counts[0] += len(keys)  # counted once the tower ran (a call that raised computed nothing)
        self._counts[1] += len(missing)
        return torch.stack([found[k] for k in keys])  # (K, S, Dv)
