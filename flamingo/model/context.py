"""`MediaContext`: the conditioning of one Flamingo call, and the `Phase` its caller says the call is in.

A context exists for the duration of one call only (`Flamingo.conditioned` sets it and clears it in `finally`); the
LM's hooks read it and nothing else. Outside a call there is no context, and the hooked LM computes exactly the bare
LM: no block runs and the added token rows are the LM's own.

What each phase means for the hooks (set by the caller, never inferred from the order of LM calls):
- FORWARD: a whole sequence (training, a plain forward, a scored context). Each token's media index is computed from
  the ids of the call; every block attends under the masking rule.
- PREFILL: a prompt before decoding. As FORWARD (a prompt prefilled in chunks continues its media index across
  calls), and each block also keeps, per row, the K/V of the prompt's last image for the decode steps.
- DECODE: tokens generated after the prompt. `<image>` cannot be generated, so each row sees its prompt's last image:
  the hooks read only tensors made in PREFILL (static shapes, so a compiled decode step neither depends on nor
  recompiles for the prompt's length or number of images). With reference tokens (or attention to every earlier
  image) a row keeps all its images' K/V instead, and a generated `<imageK>` re-targets it to image K.
- SCORE: candidate continuations run on a copy of their contexts' KV cache. Row k belongs to context
  `row_samples[k]`: it reads that context's visual K/V, and its media index continues from the context's. A
  candidate feeds no `<image>`, so under the last-image rule (no references) a row reads its context's last image's
  K/V only (`candidates_last_image_kv`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Iterator, Optional

import torch

from .xattn import GatedResidualBlock, MediaKV, XAttnImpl, flex_block_mask


class Phase(Enum):
    FORWARD = "forward"
    PREFILL = "prefill"
    DECODE = "decode"
    SCORE = "score"


@dataclass
class MediaContext:
    """Conditioning for one call (a forward, or a whole `generate` / `score`); never outlives it."""

    phase: Phase
    visual: Optional[torch.Tensor]  # (B, N, R, Dv) visual tokens, None when the batch has no media
    impl: XAttnImpl = "auto"
    document_ids: Optional[torch.Tensor] = None  # (B, T) packed rows: which sample each token belongs to
    # (rows,) the media index each row had after the earlier LM calls (PREFILL in chunks, SCORE); None = 0
    last_media_index: Optional[torch.Tensor] = None
    # (rows,) images the earlier LM calls held (with reference tokens, the index and the count part ways); None = 0
    media_count: Optional[torch.Tensor] = None
    # (rows,) `<image>` tokens of each row's whole sequence, for `attend_next_image` (a text token sees the next
    # image, so a chunk must know whether a later chunk holds one); None: the images up to the end of each LM call
    row_images: Optional[torch.Tensor] = None
    media_index: Optional[torch.Tensor] = None  # (rows, T) of the current LM call, set when the LM embeds its ids
    # (rows,) True where the row holds no image at all, with `imageless_rows_skip_blocks` (such rows skip the
    # blocks); set with media_index. In DECODE such rows have decode_index -1 instead.
    skip_rows: Optional[torch.Tensor] = None
    # (rows, 1) for DECODE: 1 where the row's prompt has an image (its last image's K/V are all it keeps), or, when
    # it keeps every image's K/V, the image it sees (updated in place by generated references); -1 where the row
    # holds no image and skips the blocks (`imageless_rows_skip_blocks`). Made eagerly in
    # PREFILL and contiguous (unlike last_media_index, a strided view), so a compiled decode step guards on it
    # without recompiling.
    decode_index: Optional[torch.Tensor] = None
    decode_count: Optional[torch.Tensor] = None  # (rows, 1) images of each row's prompt, for DECODE with references
    # DECODE: each block's K/V of the rows, (rows, N, R, h, d) (or the last image's, (rows, 1, R, h, d)), listed by
    # generate's switch to DECODE or by the server's batch (model/batching.py); [] or None entries where no row has
    # an image. Not keyed by the row count as `media_kv` is, so that a compiled step whose row count is dynamic does
    # not specialize on it.
    decode_kv: Optional[list[MediaKV]] = None
    # (rows,) SCORE: the context each candidate row belongs to (any number of candidates per context)
    row_samples: Optional[torch.Tensor] = None
    # Visual K/V by (block, rows), and ("last" | "all", block, rows) for DECODE: projected once from the B samples'
    # visual tokens and expanded by indexing when the LM runs more rows than samples (beams, return sequences).
    media_kv: dict[tuple, MediaKV] = field(default_factory=dict)
    # what the blocks share within an LM call: its flex block mask, and for each ("last", block, rows) entry of
    # media_kv the last_media_index it was taken at
    memo: dict = field(default_factory=dict)
    # FORWARD with a chunked loss: the LM's head gets no tokens (its logits are never made whole); its input, the
    # last hidden states (B, T, D), is kept here for the loss
    defer_head: bool = False
    head_input: Optional[torch.Tensor] = None

    def decode_tensors(self) -> Iterator[torch.Tensor]:
        """The DECODE tensors whose first dimension is the rows: what a compiled decode step marks dynamic."""
        kv = (t for entry in self.decode_kv or () if entry is not None for t in (entry.k, entry.v))
        yield from (t for t in (self.decode_index, self.decode_count, *kv) if t is not None)

    def for_candidates(self, rows: torch.Tensor) -> MediaContext:
        """The SCORE context of candidate rows `rows (C,)` (each the index of its context in this FORWARD context's
        batch): their media index continues from their context's, and the projected visual K/V are shared."""
        if self.last_media_index is None:
            raise RuntimeError("candidates need their contexts' forward first (it sets the contexts' media index)")
        return MediaContext(phase=Phase.SCORE, visual=self.visual, impl=self.impl,
                            last_media_index=self.last_media_index[rows], row_samples=rows, media_kv=self.media_kv,
                            media_count=None if self.media_count is None else self.media_count[rows])

    def for_recompute(self) -> MediaContext:
        """The same call's conditioning with fresh memos, for activation checkpointing's recompute (which must
        project the visual K/V again exactly as the first forward did)."""
        return replace(self, media_kv={}, memo={})

    def flex_mask(self, images: int, keys_per_image: int, only_attend_last_image: bool) -> Any:
        """The flex block mask of the current LM call's media index, made once for all its blocks (eagerly: a
        compiled block receives it as an input)."""
        if self.memo.get("flex_index") is not self.media_index:  # a new LM call (chunked prefill: a new chunk)
            self.memo["flex_index"] = self.media_index
            self.memo["flex_mask"] = flex_block_mask(self.media_index, images, keys_per_image, only_attend_last_image)
        return self.memo["flex_mask"]

    def last_image_kv_for(self, block_idx: int, block: GatedResidualBlock, rows: int) -> MediaKV:
        """Each row's last image's K/V for one block, (rows, 1, R, h, d): what DECODE steps attend to. Taken again
        after every LM call that moved the rows' media index: in a prompt prefilled in chunks, the rows' last image
        so far changes from chunk to chunk, and decoding must see the prompt's last one."""
        key = ("last", block_idx, rows)
        if self.memo.get(key) is not self.last_media_index:  # made for an earlier LM call (or not yet)
            kv = self.kv_for(block_idx, block, rows)  # (rows, N, R, h, d)
            image = (self.last_media_index - 1).clamp(min=0)  # (rows,)
            batch = torch.arange(rows, device=image.device)
            self.media_kv[key] = MediaKV(kv.k[batch, image][:, None], kv.v[batch, image][:, None])
            self.memo[key] = self.last_media_index
        return self.media_kv[key]

    def candidates_last_image_kv(self, block_idx: int, block: GatedResidualBlock) -> MediaKV:
        """SCORE under the last-image rule: each candidate row's context's last image's K/V for one block,
        (C, 1, R, h, d). Candidates feed no `<image>`, so this one image is all a candidate token sees; gathering it
        alone skips `kv_for`'s (C, N, R, h, d) copy of every image. Made once per block for this context."""
        key = ("candidates_last", block_idx)
        if key not in self.memo:
            base = self._projected(block_idx, block)  # (B, N, R, h, d)
            image = (self.last_media_index - 1).clamp(min=0)  # (C,) each row's context's last image (0: none)
            self.memo[key] = MediaKV(base.k[self.row_samples, image][:, None], base.v[self.row_samples, image][:, None])
        return self.memo[key]

    def _projected(self, block_idx: int, block: GatedResidualBlock) -> MediaKV:
        """The B samples' visual K/V of one block, (B, N, R, h, d): projected once per call."""
        samples = self.visual.shape[0]
        base = self.media_kv.get((block_idx, samples))
        if base is None:
            base = self.media_kv[(block_idx, samples)] = block.project_media(self.visual)
        return base

    def kv_for(self, block_idx: int, block: GatedResidualBlock, rows: int) -> Optional[MediaKV]:
        """The visual K/V of one block for an LM call of `rows` rows, (rows, N, R, h, d)."""
        if self.visual is None:
            return None
        samples = self.visual.shape[0]
        base = self._projected(block_idx, block)
        if self.row_samples is not None:  # SCORE: rows map to contexts by index, so nothing is memoised
            return MediaKV(base.k[self.row_samples], base.v[self.row_samples])
        if rows == samples:  # one row per sample (a forward, a prefill): no copy
            return base
        kv = self.media_kv.get((block_idx, rows))
        if kv is None:
            if rows % samples:
                raise RuntimeError(f"the LM runs {rows} rows for {samples} samples' media")
            index = torch.arange(samples, device=self.visual.device).repeat_interleave(rows // samples)
            kv = self.media_kv[(block_idx, rows)] = MediaKV(base.k[index], base.v[index])
        return kv
