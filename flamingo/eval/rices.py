"""RICES (Yang et al. 2022; Flamingo §3.3 / OpenFlamingo): retrieve in-context demos by visual similarity.

Features are the Flamingo's own frozen vision tower's patch features (`model.vision`, the layer and CLS handling of
`config.vision_feature_layer` / `drop_cls_token`), mean-pooled over patches (and over a video's frames), L2-normalised;
similarity is their cosine. The k nearest demos go into the prompt with the MOST similar LAST, next to the query.
The search set is the whole train split by default (OpenFlamingo's RICES over `train_dataset`): its features are
computed once per evaluation, `batch_size` media at a time, and the similarities a block of queries at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ..model.backbones import vision_features
from ..model.flamingo import Flamingo
from .distributed import all_gather, rank, shard
from .predict import MediaLoader

SIMILARITY_BLOCK = 2**24  # (query, pool) similarities held at once by `nearest` (64 MiB of float32)


@torch.no_grad()
def pooled_features(model: Flamingo, media: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Preprocessed media `(F, C, H, W)` each -> (M, Dv) unit-norm features, `batch_size` media per tower call."""
    if not media:
        raise ValueError("no media to compute RICES features of")
    param = next(model.vision.parameters())
    out = []
    for start in range(0, len(media), batch_size):
        chunk = list(media[start:start + batch_size])
        frames = torch.cat(chunk).to(device=param.device, dtype=param.dtype)  # (sum F, C, H, W)
        feats = vision_features(model.vision, frames, model.config.vision_feature_layer,
                                model.config.drop_cls_token).float().mean(dim=1)  # (sum F, Dv)
        per_medium = torch.split(feats, [t.shape[0] for t in chunk])
        out.append(torch.stack([f.mean(dim=0) for f in per_medium]))  # (chunk, Dv)
    features = torch.cat(out).cpu()
    return features / features.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def nearest(query: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """query (Q, D), pool (N, D) unit-norm -> (Q, k) pool indices of the k most similar, MOST SIMILAR LAST. A zero
    pool row (a demo whose image cannot be read) comes after every other. Queries go a block at a time, so that a
    whole train split as the pool holds at most SIMILARITY_BLOCK similarities at once."""
    if k > pool.shape[0]:
        raise ValueError(f"RICES: {k} demos asked but the pool holds {pool.shape[0]}")
    if k == 0:
        return torch.zeros(query.shape[0], 0, dtype=torch.long)
    unreadable = pool.norm(dim=-1) == 0  # (N,)
    rows = max(1, SIMILARITY_BLOCK // pool.shape[0])
    top = [_top_k((block @ pool.T).masked_fill(unreadable, float("-inf")), k) for block in query.split(rows)]
    return torch.cat(top).flip(-1) if top else torch.zeros(0, k, dtype=torch.long)


def _top_k(sims: torch.Tensor, k: int) -> torch.Tensor:
    """sims (R, N) -> (R, k) indices of the k largest, largest first, ties to the lower index: the k nearest are
    then the first k of one order whatever k is (`topk`'s choice among equal values depends on k, and samples
    sharing an image tie exactly: VQAv2's ~5 questions an image), so a query's demos do not depend on how many more
    its caller asked for (`select_rices` asks for more when other queries of its batch are in the pool)."""
    sims = sims.nan_to_num(nan=float("-inf"))  # (a NaN feature: never preferred, and it equals nothing)
    kth = sims.topk(k, dim=-1).values[:, -1:]  # (R, 1)
    above, tied = sims > kth, sims == kth  # (R, N)
    need = k - above.sum(dim=-1, keepdim=True)  # (R, 1): >= 1, taken from the tied values, lowest index first
    chosen = above | (tied & (tied.to(torch.int32).cumsum(dim=-1) <= need))  # exactly k per row
    picked = chosen.nonzero()[:, 1].view(sims.shape[0], k)  # (R, k) in index order
    order = sims.gather(1, picked).sort(dim=-1, descending=True, stable=True).indices
    return picked.gather(1, order)


class FeatureCache:
    """Pooled features by medium path (a sample's first medium), computed on first use in batches of `batch_size`
    media, each decoded, encoded and let go before the next (a whole train split's pixels are never held at once),
    each file once per evaluation: every trial's search set reuses them, and samples showing one image (VQAv2's ~5
    questions an image) share its feature. A medium that cannot be read gets a zero feature: `nearest` never prefers
    it, and a prompt that still holds it is skipped and counted by the runner. `progress`: a progress bar (rank 0)
    when more than one batch is to be encoded."""

    def __init__(self, model: Flamingo, load: MediaLoader, batch_size: int = 32, progress: bool = False) -> None:
        self.model, self.load, self.batch_size, self.progress = model, load, batch_size, progress
        self.features: dict[str, Optional[torch.Tensor]] = {}  # path -> feature; None: unreadable (a zero row)

    def get(self, media: Sequence[str], shared: bool = False) -> torch.Tensor:
        """Features (len(media), Dv) of media given by path (the samples' first media, repeats allowed).

        shared: every rank calls this with the same media (a collective): each encodes a strided share of the missing
        files and the features are all-gathered, so W ranks split the work instead of each doing all of it."""
        missing = [m for m in dict.fromkeys(media) if m not in self.features]
        if missing:
            mine = shard(len(missing)) if shared else list(range(len(missing)))
            local = self._encode([(j, missing[j]) for j in mine])
            feats = all_gather(local, len(missing)) if shared else [f for _, f in local]  # `local` is in order
            self.features.update(zip(missing, feats))
        known = next((f for f in self.features.values() if f is not None), None)
        if known is None:
            raise ValueError(f"RICES: none of the {len(media)} media can be read, e.g. "
                             f"{self.load.unreadable(media[:1])}")
        return torch.stack([torch.zeros_like(known) if self.features[m] is None else self.features[m] for m in media])

    def _encode(self, media: Sequence[tuple[int, str]]) -> list[tuple[int, Optional[torch.Tensor]]]:
        """(position, path) pairs -> (position, feature or None when unreadable), in order, `batch_size` files
        decoded and encoded at a time. Each feature owns its storage: a row view would carry its whole batch into
        `all_gather`'s pickles and keep it alive in the cache."""
        out: list[tuple[int, Optional[torch.Tensor]]] = []
        with tqdm(total=len(media), desc="RICES features", unit="medium",  # closed if an encoding raises
                  disable=not self.progress or rank() != 0 or len(media) <= self.batch_size) as bar:
            for start in range(0, len(media), self.batch_size):
                # not kept for the prompts: a pass over the whole train split would evict their demo media
                chunk = [(j, self.load.try_load(path, keep=False)) for j, path in media[start:start + self.batch_size]]
                readable = [m for _, m in chunk if m is not None]
                feats = iter(pooled_features(self.model, readable, self.batch_size) if readable else [])
                out += [(j, None if m is None else next(feats).clone()) for j, m in chunk]  # (Dv,) each
                bar.update(len(chunk))
        return out
