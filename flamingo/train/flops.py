"""FLOPs per training sample and MFU.

A matmul with a weight of P parameters costs 2·P FLOPs per token forward. Per sample of T text tokens, M media of
F frames of S patches, and R latents:
- frozen vision tower: forward only, no gradient: 2·P_vision·(M·F·S);
- frozen LM: forward 2·P_lm·T, plus the backward pass for the *input* gradient only (no weight gradient) 2·P_lm·T,
  so 4·P_lm·T — gradients must flow through the frozen LM down to the xattn blocks;
- trained xattn blocks (per text token) and resampler (per latent / per feature): forward 2·P and backward 4·P
  (input and weight gradients), so 6·P per token they see.
Attention score FLOPs (quadratic terms) are left out, as in the usual 6·N·T estimates; at T = 256 they are small.
P_lm leaves out the LM's input embedding, a table lookup (65M of a 1.3B Llama's parameters), unless it is tied to
the output head, whose matmul it then is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lm_matmul_parameters(lm: nn.Module) -> int:
    """The LM's parameters that multiply activations: all but an untied input embedding."""
    embedding = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return count(lm) - (0 if tied else embedding.numel())


def flops_per_sample(model: nn.Module, text_tokens: int, media: int, frames: int, patches: int) -> float:
    p_vision, p_lm = count(model.vision), lm_matmul_parameters(model.lm)
    p_xattn, p_resampler = count(model.xattn), count(model.resampler)
    features = media * frames * patches
    return (2 * p_vision * features + 4 * p_lm * text_tokens + 6 * p_xattn * text_tokens
            + 6 * p_resampler * (features + media * model.config.num_latents))


# Dense bf16 peak throughput, FLOP/s, by device name fragment.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def batch_samples(batch: dict[str, Any]) -> int:
    """Samples in a (CPU) batch: its rows, or with packed rows (`document_ids`) the samples packed into them."""
    docs = batch.get("document_ids")
    return batch["input_ids"].shape[0] if docs is None else int((docs.amax(dim=1) + 1).sum())


def flops_estimate(model: nn.Module, batch: dict[str, Any]) -> float:
    """FLOPs of one training pass of a Flamingo over `batch` (the formula above): every row's tokens (padding too: it
    is computed), but only the real media and frames (the model selects them; packed rows pad many media slots)."""
    b, t = batch["input_ids"].shape
    images = batch.get("images")
    if images is None:
        return b * flops_per_sample(model, t, 0, 0, 0)
    _, n, f, _, h, w = images.shape
    media, frames = b * n, b * n * f
    if batch.get("num_media") is not None:
        real = torch.arange(n) < torch.as_tensor(batch["num_media"]).cpu()[:, None]  # (B, N)
        media = int(real.sum())
        frames = int(torch.as_tensor(batch["num_frames"]).cpu()[real].sum()) if batch.get("num_frames") is not None \
            else media * f
    patch = getattr(model.vision.config, "patch_size", 14)
    return flops_per_sample(model, b * t, media, frames / max(media, 1), (h // patch) * (w // patch))
