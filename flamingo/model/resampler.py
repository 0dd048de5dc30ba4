"""Perceiver Resampler (Flamingo §2.1, Fig. 4) and the paper's MLP ablation.

Both map the patch features of one medium, `(F, S, D)` for F frames of S patches, to R visual tokens `(R, D)`,
whatever F and S are. Both work at the vision tower's width D.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int, act: str = "gelu") -> nn.Sequential:
    """Pre-norm MLP without biases: GELU (the paper's FFW) or ReLU (IDEFICS's perceiver)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.ReLU() if act == "relu" else nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to `concat(features, latents)`: keys/values come from both, queries from the latents.
    qk_norm: a LayerNorm on each head's queries and keys (IDEFICS's `qk_layer_norms_perceiver`)."""

    def __init__(self, *, dim: int, heads: int, head_dim: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else None

    def forward(self, features: torch.Tensor, latents: torch.Tensor,
                feature_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features (M, L, D), latents (M, R, D), feature_mask (M, L) True = real -> (M, R, D)."""
        m, r, _ = latents.shape
        features = self.norm_media(features)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)  # (M, R, inner)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)  # (M, L+R, inner)
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))  # (M, h, ·, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        mask = None
        if feature_mask is not None:
            keep = torch.cat([feature_mask, feature_mask.new_ones(m, r)], dim=1)  # latents always visible
            mask = keep[:, None, None, :]  # (M, 1, 1, L+R)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (M, h, R, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (M, R, D)


class PerceiverResampler(nn.Module):
    """x_f + time embeddings -> flatten (F·S) -> `depth` x [latents += attn(x_f, latents); latents += ffw(latents)]."""

    def __init__(self, *, dim: int, depth: int, num_latents: int, heads: int, head_dim: int, ffw_mult: int,
                 max_frames: int, qk_norm: bool = False, ffw_act: str = "gelu") -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # One learned embedding per frame index, added to every patch of that frame (paper: "time embeddings").
        # Unit-variance init, as OpenFlamingo's and lucidrains' `frame_embs`: at 0.02 they stay too small next to the
        # tower's features to tell frames apart (docs/demo.md, "time embeddings").
        self.time_embeddings = nn.Parameter(torch.randn(max_frames, dim))
        self.layers = nn.ModuleList(
            nn.ModuleDict({"attn": PerceiverAttention(dim=dim, heads=heads, head_dim=head_dim, qk_norm=qk_norm),
                           "ffw": feed_forward(dim, ffw_mult, ffw_act)})
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features (M, F, S, D) for M media of F frames, frame_mask (M, F) True = real frame -> (M, R, D)."""
        m, f, s, _ = features.shape
        if f > self.time_embeddings.shape[0]:
            raise ValueError(f"{f} frames but the resampler has time embeddings for max_frames="
                             f"{self.time_embeddings.shape[0]}")
        x = features + self.time_embeddings[:f, None, :]  # (M, F, S, D)
        x = x.flatten(1, 2)  # (M, F·S, D)
        feature_mask = None
        # a mask is applied as given, never read here (a read would break a compiled resampler's graph): the model
        # passes None when every frame is real (Flamingo.encode_media)
        if frame_mask is not None:
            feature_mask = frame_mask.to(x.device)[:, :, None].expand(m, f, s).flatten(1)  # (M, F·S)
        latents = self.latents.expand(m, -1, -1)  # (M, R, D)
        for layer in self.layers:
            latents = latents + layer["attn"](x, latents, feature_mask)
            latents = latents + layer["ffw"](latents)
        return self.norm(latents)


class MLPResampler(nn.Module):
    """Ablation ("MLP" row of the paper's resampler ablation): time embeddings, adaptive average pooling of the
    (F·S) features to R tokens, then a residual MLP. No attention, so no learned selection of what to keep."""

    def __init__(self, *, dim: int, num_latents: int, ffw_mult: int, max_frames: int) -> None:
        super().__init__()
        self.num_latents = num_latents
        self.time_embeddings = nn.Parameter(torch.randn(max_frames, dim))  # as PerceiverResampler's
        self.ffw = feed_forward(dim, ffw_mult)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features (M, F, S, D), frame_mask (M, F) -> (M, R, D). Padded frames are left out of the pooling."""
        m, f, s, d = features.shape
        if f > self.time_embeddings.shape[0]:
            raise ValueError(f"{f} frames but max_frames={self.time_embeddings.shape[0]}")
        x = features + self.time_embeddings[:f, None, :]  # (M, F, S, D)
        frame_mask = torch.ones(m, f, dtype=torch.bool) if frame_mask is None else frame_mask.cpu()
        out = []
        for i in range(m):  # media differ in their number of real frames
            xi = x[i, frame_mask[i]].flatten(0, 1)  # (F_i·S, D)
            out.append(F.adaptive_avg_pool1d(xi.T[None], self.num_latents)[0].T)  # (R, D)
        tokens = torch.stack(out)  # (M, R, D)
        return self.norm(tokens + self.ffw(tokens))
