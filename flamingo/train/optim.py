"""AdamW over the trained parameters only (fp32 or 8-bit states), and the warmup + constant/linear/cosine schedule."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..model.lora import is_adapter_key


def param_groups(model: nn.Module, weight_decay: float, lr: float, gate_lr_mult: float = 1.0,
                 attn_gate_lr_mult: Optional[float] = None) -> list[dict]:
    """Trained parameters only. Weight decay on the xattn blocks' matrices (as OpenFlamingo v1 does; 2.0 decays their
    gates and norms too) and on the LM's LoRA matrices (decay pulls them towards the bare LM); none on norms, gates,
    the resampler, or the added token rows.
    The tanh gates may get their own learning rate (`gate_lr_mult` x lr): a gate starts at 0 and its gradient is noisy
    while the block is still untrained, so in short runs it can stay near 0 for long; a larger step lets the images
    matter sooner. `attn_gate_lr_mult` (default:
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
        elif (name.startswith("xattn.") or is_adapter_key(name)) and p.ndim >= 2:
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


OPTIMIZER_KINDS = ("adamw", "adamw8bit")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Iterable[float], eps: float,
                   fused: bool = False, gate_lr_mult: float = 1.0,
                   attn_gate_lr_mult: Optional[float] = None, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over `param_groups`. kind="adamw": torch's, 8 bytes of fp32 state per trained parameter.
    kind="adamw8bit": torchao's AdamW8bit, 2 bytes (block-wise quantized moments, Dettmers et al. 2022); tensors
    under 4096 values (norms, gates, biases), or whose value count (per rank shard under FSDP2) is not a multiple of
    its 256-value block, keep fp32 states (docs/memory.md). Its update is a torch.compile'd kernel per parameter
    shape: the first step compiles them (seconds each on a CPU), later steps reuse them."""
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"unknown optimizer kind {kind!r}: {' or '.join(OPTIMIZER_KINDS)}")
    groups = param_groups(model, weight_decay, lr, gate_lr_mult, attn_gate_lr_mult)
    if kind == "adamw":
        kwargs = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)
    if fused:
        raise ValueError("optim.fused is torch's AdamW kernel: it does not apply to optim.kind=adamw8bit")
    optimizer = _adamw8bit()(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if any(hasattr(p, "full_tensor") for g in groups for p in g["params"]):  # FSDP2 shards (DTensors)
        # Ranks hold shards of different shapes under one global shape, and AOT autograd's on-disk cache keys the
        # compiled update by the global one: a rank would load another rank's kernel and fail a size assertion.
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = False
    return optimizer


def _adamw8bit() -> type:
    """torchao's AdamW8bit class, or a clear error where it cannot run."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        raise ImportError("optim.kind=adamw8bit needs torchao: pip install 'flamingo-vlm[memory]'") from e
    if not _has_compiler():
        # a ValueError: an option this machine cannot run (as QuantizationUnavailable), said in the CLI's one line
        raise ValueError("optim.kind=adamw8bit compiles its update with torch.compile, which on a CPU needs a C++ "
                         "compiler (g++ or clang++, or $CXX): install one or use optim.kind=adamw")
    return AdamW8bit


def _has_compiler() -> bool:
    """A C++ compiler for inductor's CPU kernels (CUDA kernels are Triton's, but the host side still builds C++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return any(shutil.which(name) for name in names)


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


GROUP_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps")  # what the config sets per parameter group


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's config-given settings as plain numbers: its base lr (`initial_lr`, which the schedule
    scales), weight decay, betas and eps."""
    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):  # torchao keeps the lr as a tensor
            return float(value)
        return tuple(plain(v) for v in value) if isinstance(value, (tuple, list)) else value

    return [{k: plain(g[k]) for k in GROUP_SETTINGS} for g in optimizer.param_groups]


def apply_group_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         settings: list[dict[str, Any]]) -> None:
    """Give each parameter group `settings` (`group_settings` of a freshly made optimizer), the scheduler the same
    base lrs, and each group the lr of the scheduler's current step under them (base x the schedule's multiplier)."""
    if len(settings) != len(optimizer.param_groups):
        raise ValueError(f"{len(settings)} parameter groups for an optimizer of {len(optimizer.param_groups)}")
    for group, values, multiplier in zip(optimizer.param_groups, settings, scheduler.lr_lambdas):
        for key, value in values.items():
            _set(group, key, value)
        _set(group, "lr", values["initial_lr"] * multiplier(scheduler.last_epoch))
    scheduler.base_lrs = [values["initial_lr"] for values in settings]


def _set(group: dict[str, Any], key: str, value: Any) -> None:
    """A group's value replaced; a tensor one (torchao's lr) filled in place, as its optimizer requires."""
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value
