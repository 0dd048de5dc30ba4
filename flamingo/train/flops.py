"""FLOPs per training sample and MFU.

A matmul with a weight of P parameters costs 2·P FLOPs per token forward; its backward 2·P for the input gradient
(when gradients flow on below it) and 2·P for the weight gradient (when the weight trains). Per sample of T text
tokens, M media of F frames of S patches, and R latents:
- vision tower: frozen (`freeze_vision`), forward only, without gradients, 2·P_vision·(M·F·S); trained,
  6·P_vision·(M·F·S);
- LM: forward 2·P_lm·T plus the input gradient 2·P_lm·T (gradients flow through a frozen LM down to the xattn blocks),
  so 4·P_lm·T, plus the weight gradient 2·P·T of the LM weights that train: all of them with `freeze_lm: false`, the
  LoRA adapters with `lm_lora`;
- xattn blocks, trained: their K/V projections run over the M·R visual tokens, 6·P_kv·M·R, their other weights
  over the text, 6·P_rest·T;
- Perceiver resampler, trained: its K/V projections see the features and the latents, 6·P_kv·M·(F·S + R) (the
  features' input gradient too: the LayerNorm before them trains); its other weights (queries, output, feed-forward)
  see the latents only, 6·P_rest·M·R. The MLP resampler pools the features first: 6·P·M·R.
Attention score FLOPs (quadratic terms) are left out, as in the usual 6·N·T estimates; at T = 256 they are small.
P counts the weights that multiply activations: P_lm leaves out the LM's input embedding, a table lookup (65M of a
1.3B Llama's parameters), unless it is tied to the output head, whose matmul it then is; the resampler's count leaves
out its latents, time embeddings and LayerNorms. On the tiny test model the estimate is within 3% of
torch.utils.flop_counter.FlopCounterMode's count of one forward and backward (tests/test_flops.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..model.resampler import PerceiverAttention


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lm_matmul_parameters(lm: nn.Module, trained: bool = False) -> int:
    """The LM's parameters that multiply activations: all but an untied input embedding (trained: only those that
    train, such as LoRA adapters' or a trained LM's)."""
    embedding = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return sum(p.numel() for p in lm.parameters()
               if (tied or p is not embedding) and (p.requires_grad or not trained))


def resampler_matmul_parameters(resampler: nn.Module) -> tuple[int, int]:
    """(P_kv, P_rest): the resampler's K/V projection weights, which see the visual features, and its other matmul
    weights, which see the latents only."""
    linear = [m for m in resampler.modules() if isinstance(m, nn.Linear)]
    kv = [m.to_kv for m in resampler.modules() if isinstance(m, PerceiverAttention)]
    p_kv = sum(m.weight.numel() for m in kv)
    return p_kv, sum(m.weight.numel() for m in linear) - p_kv


def xattn_kv_parameters(xattn: nn.Module) -> int:
    """The xattn blocks' K/V projection weights (`to_kv`), which see the visual tokens, not the text."""
    return sum(m.to_kv.weight.numel() for m in xattn.modules()
               if hasattr(m, "project_media") and isinstance(getattr(m, "to_kv", None), nn.Linear))


@dataclass(frozen=True)
class FlopCounts:
    """The parameter counts the formula multiplies, taken once per model (`flop_counts`): they do not change while it
    trains, and walking every parameter at every micro-batch would cost the step milliseconds."""

    vision: int
    vision_trained: bool
    lm: int  # matmul weights (`lm_matmul_parameters`)
    lm_trained: int  # of those, the ones that train (a trained LM's, LoRA adapters')
    xattn: int
    xattn_kv: int
    resampler_kv: int
    resampler_rest: int
    latents: int  # R


def flop_counts(model: nn.Module) -> FlopCounts:
    p_kv, p_rest = resampler_matmul_parameters(model.resampler)
    return FlopCounts(vision=count(model.vision), vision_trained=not model.config.freeze_vision,
                      lm=lm_matmul_parameters(model.lm), lm_trained=lm_matmul_parameters(model.lm, trained=True),
                      xattn=count(model.xattn), xattn_kv=xattn_kv_parameters(model.xattn), resampler_kv=p_kv,
                      resampler_rest=p_rest, latents=model.config.num_latents)


def flops_per_sample(model: nn.Module, text_tokens: int, media: int, frames: int, patches: int,
                     counts: Optional[FlopCounts] = None) -> float:
    """FLOPs of one training pass over T text tokens and M media of F frames of S patches (the formula above);
    counts: `flop_counts(model)`, taken once by a caller that asks every step."""
    c = counts or flop_counts(model)
    features, latents = media * frames * patches, media * c.latents
    vision = (6 if c.vision_trained else 2) * c.vision * features
    lm = (4 * c.lm + 2 * c.lm_trained) * text_tokens
    resampler = 6 * c.resampler_kv * (features + latents) + 6 * c.resampler_rest * latents
    xattn = 6 * (c.xattn - c.xattn_kv) * text_tokens + 6 * c.xattn_kv * latents
    return vision + lm + xattn + resampler


# Dense bf16 peak throughput, FLOP/s, by device name fragment, the first that matches (the H100's PCIe and NVL cards
# before the SXM part, whose names say only "H100").
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def batch_samples(batch: dict[str, Any]) -> int:
    """Samples in a (CPU) batch: its rows, or with packed rows (`document_ids`) the samples packed into them."""
    docs = batch.get("document_ids")
    return batch["input_ids"].shape[0] if docs is None else int((docs.amax(dim=1) + 1).sum())


def flops_estimate(model: nn.Module, batch: dict[str, Any], counts: Optional[FlopCounts] = None) -> float:
    """FLOPs of one training pass of a Flamingo over `batch` (the formula above): every row's tokens (padding too: it
    is computed), but only the real media and frames (the model selects them; packed rows pad many media slots)."""
    b, t = batch["input_ids"].shape
    images = batch.get("images")
    if images is None:
        return b * flops_per_sample(model, t, 0, 0, 0, counts)
    _, n, f, _, h, w = images.shape
    media, frames = b * n, b * n * f
    if batch.get("num_media") is not None:
        real = torch.arange(n) < torch.as_tensor(batch["num_media"]).cpu()[:, None]  # (B, N)
        media = int(real.sum())
        frames = int(torch.as_tensor(batch["num_frames"]).cpu()[real].sum()) if batch.get("num_frames") is not None \
            else media * f
    patch = getattr(model.vision.config, "patch_size", 14)
    return flops_per_sample(model, b * t, media, frames / max(media, 1), (h // patch) * (w // patch), counts)
