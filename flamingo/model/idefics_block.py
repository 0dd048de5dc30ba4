"""IDEFICS's gated cross-attention block (`block: idefics`), as transformers implements it (DESIGN §10).

x = x + tanh(a_attn) · xattn(RMSNorm(x), visual), with optional RMSNorm on each head's queries and keys;
x = x + tanh(a_ffw) · down(silu(gate(RMSNorm(x))) · up(RMSNorm(x))).
The masking rule and its implementations are the paper block's (`masked_cross_attention`): a token attends to the R
visual tokens of its image and gets exactly zero from the attention when it has none. The keys are normalised once,
when the visual tokens are projected (the norm is per head and position-free), so decoding reads them from the cache
as the paper block does; IDEFICS itself re-projects them at every decode step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .xattn import GatedResidualBlock, MediaKV, XAttnImpl, masked_cross_attention


class RMSNorm(nn.Module):
    """Llama's / IDEFICS's RMSNorm: normalised in fp32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GatedMLP(nn.Module):
    """Pre-RMSNorm gated SiLU MLP (Llama's): down(silu(gate(x)) · up(x))."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class IdeficsCrossAttention(nn.Module):
    """Pre-RMSNorm text queries attend to the visual tokens under the masking rule; optional q/k RMSNorm per head."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, head_dim: int, qk_norm: bool, eps: float,
                 only_attend_last_image: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.only_attend_last_image = only_attend_last_image
        inner = heads * head_dim
        self.norm = RMSNorm(dim, eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def project_media(self, visual: torch.Tensor) -> MediaKV:
        """visual (B, N, R, Dv) -> MediaKV of (B, N, R, h, d), keys already normalised."""
        k, v = self.to_kv(visual).chunk(2, dim=-1)
        k, v = k.unflatten(-1, (self.heads, self.head_dim)), v.unflatten(-1, (self.heads, self.head_dim))
        return MediaKV(k if self.k_norm is None else self.k_norm(k), v)

    def forward(self, x: torch.Tensor, kv: MediaKV, media_index: torch.Tensor, impl: XAttnImpl = "auto",
                block_mask: Any = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        q = self.to_q(self.norm(x)).unflatten(-1, (self.heads, self.head_dim))  # (B, T, h, d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        out = masked_cross_attention(q, kv, media_index, only_attend_last_image=self.only_attend_last_image,
                                     impl=impl, block_mask=block_mask)
        return self.to_out(out.flatten(2))


class IdeficsCrossAttentionBlock(GatedResidualBlock):
    """IDEFICS's GATED XATTN-DENSE (RMSNorm'd cross-attention with optional q/k norms, a gated SiLU MLP); the same
    interface and gate parameters as `GatedCrossAttentionBlock`."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, head_dim: int, ffw_dim: int, eps: float = 1e-6,
                 qk_norm: bool = False, gated: bool = True, only_attend_last_image: bool = True,
                 gate_type: str = "scalar") -> None:
        super().__init__(IdeficsCrossAttention(dim=dim, dim_visual=dim_visual, heads=heads, head_dim=head_dim,
                                               qk_norm=qk_norm, eps=eps, only_attend_last_image=only_attend_last_image),
                         GatedMLP(dim, ffw_dim, eps), dim=dim, gated=gated, gate_type=gate_type)
