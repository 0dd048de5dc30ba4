"""RICES (Yang et al. 2022; Flamingo §3.3 / OpenFlamingo): retrieve in-context demos by visual similarity.

Features are the Flamingo's own frozen vision tower's patch features (`model.vision`, the layer and CLS handling of
`config.vision_feature_layer` / `drop_cls_token`), mean-pooled over patches (and over a video's frames), L2-normalised;
similarity is their cosine. The k nearest demos go into the prompt with the MOST similar LAST, next to the query.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model.backbones import vision_features
from ..model.flamingo import Flamingo
from .distributed import all_gather, shard
from .predict import MediaLoader


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
    pool row (a demo whose image cannot be read) comes after every other."""
    if k > pool.shape[0]:
        raise ValueError(f"RICES: {k} demos asked but the pool holds {pool.shape[0]}")
    if k == 0:
        return torch.zeros(query.shape[0], 0, dtype=torch.long)
    similarity = (query @ pool.T).masked_fill(pool.norm(dim=-1) == 0, float("-inf"))  # (Q, N)
    top = similarity.topk(k, dim=-1).indices  # (Q, k), most similar first
    return top.flip(-1)


class FeatureCache:
    """Pooled features by sample id, computed on first use in batches (a query set's features once per seed). A
    sample whose first medium cannot be read gets a zero feature: `nearest` never prefers it, and a prompt that still
    holds it is skipped and counted by the runner."""

    def __init__(self, model: Flamingo, load: MediaLoader, batch_size: int = 32) -> None:
        self.model, self.load, self.batch_size = model, load, batch_size
        self.features: dict[str, Optional[torch.Tensor]] = {}  # None: unreadable (a zero row once the size is known)

    def get(self, ids: Sequence[str], first_media: Sequence[str], shared: bool = False) -> torch.Tensor:
        """Features (len(ids), Dv) of samples given their ids and first medium's path.

        shared: every rank calls this with the same ids (a collective): each encodes a strided share of the missing
        media and the features are all-gathered, so W ranks split the work instead of each doing all of it."""
        missing = [(i, m) for i, m in dict(zip(ids, first_media)).items() if i not in self.features]
        if missing:
            mine = shard(len(missing)) if shared else range(len(missing))
            media = {j: self.load.try_load(missing[j][1]) for j in mine}  # each file decoded once
            readable = [j for j, m in media.items() if m is not None]
            local: list[tuple[int, Optional[torch.Tensor]]] = list(zip(readable, pooled_features(
                self.model, [media[j] for j in readable], self.batch_size))) if readable else []
            local += [(j, None) for j, m in media.items() if m is None]
            feats = all_gather(local, len(missing)) if shared else [f for _, f in sorted(local, key=lambda x: x[0])]
            self.features.update({i: f for (i, _), f in zip(missing, feats)})
        known = next((f for f in self.features.values() if f is not None), None)
        if known is None:
            raise ValueError(f"RICES: none of the {len(ids)} media can be read, e.g. "
                             f"{self.load.unreadable(first_media[:1])}")
        return torch.stack([torch.zeros_like(known) if self.features[i] is None else self.features[i] for i in ids])
