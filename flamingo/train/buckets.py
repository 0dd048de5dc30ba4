"""Padding buckets: a batch's text length and media count rounded up, so a compiled step sees few shapes.

Padding is exact for a training forward: text is padded on the right (causal attention: no real token sees it),
with `attention_mask` 0 and labels -100 (no loss); media slots are padded with empty images that `num_media` leaves
out (the tower never sees them, and no `<image>` token points at them).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def pad_to_buckets(batch: dict[str, Any], *, tokens_multiple: int, media_multiple: int,
                   pad_token_id: int, max_tokens: Optional[int] = None) -> dict[str, Any]:
    """A CPU batch (`flamingo.data`'s collate) with T rounded up to `tokens_multiple` and N to `media_multiple`.
    max_tokens: the LM's positions, which padded columns take too: a bucket never pads past them (a row of 44
    tokens on 44 positions stays 44 wide, not 48)."""
    out = dict(batch)
    ids = batch["input_ids"]  # (B, T)
    b, t = ids.shape
    width = round_up(t, tokens_multiple)
    if max_tokens is not None:
        width = max(t, min(width, max_tokens))
    extra = width - t
    if extra:
        out["input_ids"] = F.pad(ids, (0, extra), value=pad_token_id)
        mask = batch.get("attention_mask")
        out["attention_mask"] = F.pad(torch.ones_like(ids) if mask is None else mask, (0, extra), value=0)
        if batch.get("labels") is not None:
            out["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        if batch.get("document_ids") is not None:  # packed rows: -1 marks padding (data/sequence.py)
            out["document_ids"] = F.pad(batch["document_ids"], (0, extra), value=-1)
    images = batch.get("images")  # (B, N, F, C, H, W)
    if images is not None:
        n = images.shape[1]
        more = round_up(n, media_multiple) - n
        if more:
            if batch.get("num_media") is None:  # every slot was real: say so before adding empty ones
                out["num_media"] = torch.full((b,), n, dtype=torch.long)
            out["images"] = torch.cat([images, images.new_zeros(b, more, *images.shape[2:])], dim=1)
            if batch.get("num_frames") is not None:  # (B, N): padded slots count one frame (never read)
                out["num_frames"] = F.pad(torch.as_tensor(batch["num_frames"]), (0, more), value=1)
    return out
