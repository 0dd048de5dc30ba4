"""Dtype names as configs and command lines spell them."""

from __future__ import annotations

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> the torch dtype; any other name is a clear error."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: choose from {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]
