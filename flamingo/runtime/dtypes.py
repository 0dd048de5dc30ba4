"""Dtype names as configs and command lines spell them (torch is imported when a name is resolved)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # name -> torch's


def torch_dtype(name: str) -> "torch.dtype":
    """'fp32' | 'bf16' | 'fp16' -> the torch dtype; any other name is a clear error."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: choose from {sorted(DTYPE_NAMES)}")
    import torch

    return getattr(torch, DTYPE_NAMES[name])
