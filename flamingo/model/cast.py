"""Casting a whole model to one dtype as transformers' `from_pretrained(dtype=...)` leaves an LM: its rotary
frequencies stay float32."""

from __future__ import annotations

import torch
from torch import nn

# The buffers of HF's rotary embedding modules that `from_pretrained(dtype=...)` computes, and keeps, in float32.
# Rounded to bf16 they are up to 0.4% off at head size 128: rotation angles several radians off thousands of tokens
# apart. Other non-persistent float buffers (Gemma's embed_scale) follow the dtype there, so here too.
ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


def is_rotary_embedding(module: nn.Module) -> bool:
    """transformers' own test for the modules whose frequencies its weight init recomputes in float32."""
    return "RotaryEmbedding" in type(module).__name__


def to_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)`, its rotary embeddings' float32 frequency buffers (`ROTARY_BUFFERS`) left float32."""
    kept = [(m, name, buffer) for m in module.modules() if is_rotary_embedding(m) for name in ROTARY_BUFFERS
            if (buffer := m._buffers.get(name)) is not None and buffer.dtype == torch.float32]
    module.to(dtype)
    for m, name, buffer in kept:
        m._buffers[name] = buffer
    return module
