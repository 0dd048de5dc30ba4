"""AdamW over the trained parameters only, and the warmup + constant/linear/cosine schedule."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, lr: float, gate_lr_mult: float = 1.0,
                 attn_gate_lr_mult: Optional[float] = None) -> list[dict]:
    """Trained parameters only. Weight decay on the xattn blocks' matrices (as OpenFlamingo does); none on norms,
    gates, the resampler, or the added token rows. The tanh gates may get their own learning rate
    (`gate_lr_mult` x lr): a gate starts at 0 and its gradient is noisy while the block is still untrained, so in short
    runs it can stay near 0 for long; a larger step lets the images matter sooner. `attn_gate_lr_mult` (default:
    `gate_lr_mult`) sets the attention gates' multiplier apart: an attention gate whose large steps flip its sign
    around 0 leaves the block's attention weights chasing that sign, and they never learn."""
    decay, no_decay, gates, attn_gates = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("xattn.") and name.endswith("attn_gate") and attn_gate_lr_mult is not None:
            attn_gates.append(p)
        elif name.startswith("xattn.") and name.endswith("_gate"):
            gates.append(p)
        elif name.startswith("xattn.") and p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": lr * gate_lr_mult})
    if attn_gates:
        groups.append({"params": attn_gates, "weight_decay": 0.0, "lr": lr * attn_gate_lr_mult})
    return groups


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Iterable[float], eps: float,
                   fused: bool = False, gate_lr_mult: float = 1.0,
                   attn_gate_lr_mult: Optional[float] = None) -> torch.optim.AdamW:
    kwargs = {"fused": True} if fused else {}
    groups = param_groups(model, weight_decay, lr, gate_lr_mult, attn_gate_lr_mult)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base lr at a step: linear warmup, then constant, linear decay to 0 or cosine to 0."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}: constant, linear or cosine")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))
