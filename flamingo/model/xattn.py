"""GATED XATTN-DENSE (Flamingo §2.2, Fig. 4) and the masking rule, written once.

The rule: `media_index[b, t]` = number of `<image>` tokens in sample b at positions <= t (the `<image>` token sees
its own image). Token t attends to the R visual tokens of image `media_index[b, t]` only (or to every image up to it
when `only_attend_last_image=False`); a token with media index 0 gets exactly zero from the attention — its output
is zeroed, never a softmax over fully masked keys (IDEFICS #26428). OpenFlamingo v1's variant (`next_image_index`,
config `attend_next_image`): a text token sees the next image instead, none after its row's last.

Three exact implementations of the same rule, checked against each other in tests:
- `reference`: SDPA over all N·R visual tokens with a boolean mask. Cost grows with N.
- `segments`: tokens seeing the same image form contiguous runs; cut runs into pieces of P tokens and attend each
  piece to its image's R keys in one padded batch. Cost O(T·R), independent of N.
- `gather`: for a handful of query tokens (decode steps), gather each token's own image keys. O(T·R) memory.
- `flex`: FlexAttention with a block mask built from the media index (once per LM call by the caller, outside any
  compiled region, and shared by all blocks). Block-sparse on GPU (compiled); eager on CPU, where it serves tests
  only (no CPU backward).

`choose_impl` says which one "auto" runs; the LM's layer hooks ask it first, so that the flex block mask is made
eagerly and a compiled block (`train.compile`) receives it as an input.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .resampler import feed_forward

XAttnImpl = Literal["auto", "reference", "segments", "gather", "flex"]
GATHER_TOKENS = 16  # "auto": up to this many query tokens per row, each gathers its own image's keys
_compiled_flex: Any = None


class MediaKV(NamedTuple):
    """Keys and values of the visual tokens for one block, `(B, N, R, heads, head_dim)` each."""

    k: torch.Tensor
    v: torch.Tensor


def compute_media_index(input_ids: torch.Tensor, media_token_id: int,
                        start: Optional[torch.Tensor] = None,
                        document_ids: Optional[torch.Tensor] = None, *,
                        references: Optional[tuple[int, int]] = None,
                        start_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input_ids (B, T) -> media_index (B, T): which image each token sees (1-based, 0: none).

    The rule: a token sees the image of the last `<image>` at or before it (that is, the number of images so far),
    plus `start (B,)`, the index the row had after its earlier calls (cached decoding, chunked prefill).

    references = (first id, count): MMICL-style reference tokens (`<image0>`, `<image1>`, ... at ids first,
    first + 1, ...). A reference to image k re-targets the tokens at and after it to image k + 1 (1-based) until the
    next image or reference; one to an image the row has not seen yet changes nothing. Then `start` is the index
    after earlier calls and `start_count (B,)` the number of images they held (a later `<image>` counts on from it).

    document_ids (B, T): packed rows, where each run of equal ids is one sample. A token then sees only the images
    of its own sample: the index keeps counting the row's images (the row's media are its samples' media in order),
    but is 0 until the sample's first `<image>` (or reference, which counts from the sample's first image)."""
    is_media = (input_ids == media_token_id).long()
    index = is_media.cumsum(dim=1)
    if document_ids is not None and start is not None:
        raise ValueError("packed rows (document_ids) are for training and scoring forwards, not cached decoding")
    if references is not None:
        return _media_index_with_references(input_ids, is_media, index, start, document_ids, references, start_count)
    if document_ids is not None:
        earlier = value_at_document_start(index - is_media, document_ids)  # images of the row's earlier samples
        index = torch.where(index > earlier, index, 0)
    if start is not None:
        index = index + start[:, None]
    return index


def next_image_index(count: torch.Tensor, is_media: torch.Tensor,
                     row_images: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OpenFlamingo v1's rule at inference (`attend_previous=False` in its `MaskedCrossAttention`): count (B, T), the
    images at or before each token (`compute_media_index`) -> media index (B, T). An `<image>` token sees its own
    image, a text token the next one: count + 1, or 0 when the row has no image after it (text after the row's last
    image sees none). row_images (B,): the images of each row's whole sequence, when it comes in several LM calls
    (chunked prefill); None: the images up to the end of this call."""
    total = count[:, -1] if row_images is None else row_images.to(count.device)  # (B,)
    index = torch.where(is_media.bool(), count, count + 1)
    return torch.where(index > total[:, None], 0, index)


def _media_index_with_references(input_ids: torch.Tensor, is_media: torch.Tensor, count: torch.Tensor,
                                 start: Optional[torch.Tensor], document_ids: Optional[torch.Tensor],
                                 references: tuple[int, int], start_count: Optional[torch.Tensor]) -> torch.Tensor:
    """`compute_media_index` when reference tokens exist: the value of the last image or reference event."""
    first, n = references
    if start_count is not None:
        count = count + start_count[:, None]  # (B, T) images so far, this token included
    earlier = torch.zeros_like(count) if document_ids is None else value_at_document_start(count - is_media,
                                                                                            document_ids)
    target = input_ids - first + 1 + earlier  # a reference's image, counted in the row
    is_ref = (input_ids >= first) & (input_ids < first + n) & (target <= count)
    value = torch.where(is_media.bool(), count, torch.where(is_ref, target, 0))  # (B, T)
    t = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last = torch.where(is_media.bool() | is_ref, t, -1).cummax(dim=1).values  # (B, T) the last event at or before
    index = value.gather(1, last.clamp(min=0))
    carried = torch.zeros_like(index) if start is None else start[:, None].expand_as(index)
    if document_ids is not None:  # an event of an earlier packed sample is not this token's
        last = torch.where(last >= value_at_document_start(t, document_ids), last, -1)
    return torch.where(last >= 0, index, carried)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T) -> (B, T) bool: True where a packed sample (a run of equal ids) begins."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def value_at_document_start(values: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """values (B, T), non-decreasing along T -> (B, T): each token gets the value at its own packed sample's first
    token (carried forward by a running max)."""
    return torch.where(document_starts(document_ids), values, 0).cummax(dim=1).values


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T) -> position ids (B, T) that restart at 0 where each packed sample begins."""
    t = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    return t - value_at_document_start(t, document_ids)


def _attend_reference(q: torch.Tensor, kv: MediaKV, media_index: torch.Tensor, only_last: bool) -> torch.Tensor:
    b, t, h, d = q.shape
    n, r = kv.k.shape[1], kv.k.shape[2]
    k = kv.k.flatten(1, 2).transpose(1, 2)  # (B, h, N·R, d)
    v = kv.v.flatten(1, 2).transpose(1, 2)
    # One image per row (pairs, decode steps): a row with it sees all R keys and one without is zeroed by the
    # caller, so no mask (none to build, and SDPA keeps its unmasked kernels: flash on CUDA).
    mask: torch.Tensor | None = None
    if n > 1:
        image_of_key = torch.arange(1, n + 1, device=q.device).repeat_interleave(r)  # (N·R,)
        idx = media_index[:, :, None]  # (B, T, 1)
        allowed = (image_of_key == idx) if only_last else (image_of_key <= idx)  # (B, T, N·R)
        mask = (allowed | (idx == 0))[:, None]  # (B, 1, T, N·R); rows with no image: any finite softmax, zeroed
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)  # (B, h, T, d)
    return out.transpose(1, 2)  # (B, T, h, d)


def _attend_gather(q: torch.Tensor, kv: MediaKV, media_index: torch.Tensor) -> torch.Tensor:
    b, t, h, d = q.shape
    image = (media_index - 1).clamp(min=0)  # (B, T)
    batch = torch.arange(b, device=q.device)[:, None].expand(b, t)
    k = kv.k[batch, image]  # (B, T, R, h, d)
    v = kv.v[batch, image]
    # scores and softmax in fp32 for bf16/fp16 models: a half-precision q·k rounds, and overflows fp16 before the
    # scale, where SDPA (the other impls) scales first
    scores = torch.einsum("bthd,btrhd->bthr", q.float(), k.float()) * d**-0.5  # (B, T, h, R)
    return torch.einsum("bthr,btrhd->bthd", scores.softmax(dim=-1).to(v.dtype), v)  # (B, T, h, d)


def _attend_segments(q: torch.Tensor, kv: MediaKV, media_index: torch.Tensor) -> torch.Tensor:
    b, t, h, d = q.shape
    n = kv.k.shape[1]
    out = q.new_zeros(b, t, h, d)
    b_idx, t_idx = (media_index > 0).nonzero(as_tuple=True)  # ordered by (b, t): runs are contiguous
    if b_idx.numel() == 0:
        return out
    key = b_idx * n + media_index[b_idx, t_idx] - 1  # flat image id per query token, (M,)
    m = key.numel()
    new_run = torch.ones(m, dtype=torch.bool, device=q.device)
    new_run[1:] = key[1:] != key[:-1]
    run_id = new_run.cumsum(0) - 1  # (M,)
    run_start = new_run.nonzero(as_tuple=True)[0]  # (runs,)
    pos_in_run = torch.arange(m, device=q.device) - run_start[run_id]
    run_len = torch.bincount(run_id)
    # Piece length: the mean run length rounded up to a power of two, so padding wastes at most ~2x.
    piece = 1 << max(3, int(m / run_len.numel() - 1).bit_length())
    pieces_per_run = (run_len + piece - 1) // piece
    piece_offset = pieces_per_run.cumsum(0) - pieces_per_run
    piece_id = piece_offset[run_id] + pos_in_run // piece  # (M,)
    slot = pos_in_run % piece
    g = int(pieces_per_run.sum())
    queries = q.new_zeros(g, piece, h, d)
    queries[piece_id, slot] = q[b_idx, t_idx]
    piece_image = key.new_zeros(g)
    piece_image[piece_id] = key
    k = kv.k.flatten(0, 1).index_select(0, piece_image).transpose(1, 2)  # (G, h, R, d)
    v = kv.v.flatten(0, 1).index_select(0, piece_image).transpose(1, 2)
    attended = F.scaled_dot_product_attention(queries.transpose(1, 2), k, v).transpose(1, 2)  # (G, P, h, d)
    out[b_idx, t_idx] = attended[piece_id, slot]
    return out


def flex_block_mask(media_index: torch.Tensor, n: int, r: int, only_last: bool) -> Any:
    """The FlexAttention block mask of the masking rule for media_index (B, T) over n images of r keys each."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        image = kv_idx // r + 1
        seen = media_index[b, q_idx]
        return (image == seen) if only_last else (image <= seen)

    b, t = media_index.shape
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=t, KV_LEN=n * r, device=media_index.device)


def _attend_flex(q: torch.Tensor, kv: MediaKV, media_index: torch.Tensor, only_last: bool,
                 block_mask: Any) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    n, r = kv.k.shape[1], kv.k.shape[2]
    mask = block_mask if block_mask is not None else flex_block_mask(media_index, n, r, only_last)
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            # dynamic=None (automatic): the first shape compiles static and a size that changes becomes symbolic,
            # so recompiles stop once B, T and N·R have each varied (tests/test_xattn_cuda.py; figures in
            # docs/architecture.md). dynamic=False compiles one graph per shape and, past torch's recompile limit,
            # falls back to an unfused path that materializes all scores; dynamic=True does not build on CPU.
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    k = kv.k.flatten(1, 2).transpose(1, 2)  # (B, h, N·R, d)
    v = kv.v.flatten(1, 2).transpose(1, 2)
    return fn(q.transpose(1, 2), k, v, block_mask=mask).transpose(1, 2)  # (B, T, h, d)


def flex_available(device: torch.device) -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda"


def choose_impl(impl: XAttnImpl, tokens: int, images: int, only_attend_last_image: bool,
                device: torch.device) -> XAttnImpl:
    """The implementation `impl` runs for `tokens` query tokens per row over `images` images per row: itself, or
    for "auto" the fastest exact one for the shape, the device and whether gradients are on."""
    if impl != "auto":
        return impl
    if images == 1:  # one medium per row (pairs, videos, one-image prompts): dense over its R keys is exact and
        return "reference"  # cheapest (no per-token or per-run copies of the keys)
    if tokens <= GATHER_TOKENS and only_attend_last_image:  # a few tokens (scored continuations)
        return "gather"  # per-token keys: its backward, a scatter-add of (B, T, R, h, d), is slow for training
    if flex_available(device) and torch.is_grad_enabled():  # training: block-sparse forward and backward
        return "flex"
    if device.type == "cuda":  # inference prefill on GPU: one dense masked SDPA (no block mask to build, no compile)
        return "reference"
    return "segments" if only_attend_last_image else "reference"


def masked_cross_attention(q: torch.Tensor, kv: MediaKV, media_index: torch.Tensor, *,
                           only_attend_last_image: bool = True, impl: XAttnImpl = "auto",
                           block_mask: Any = None) -> torch.Tensor:
    """q (B, T, h, d) attends to kv (B, N, R, h, d) under the masking rule -> (B, T, h, d); zero where index is 0.

    block_mask: for "flex", the mask `flex_block_mask` made for this media index (made here when None).
    """
    impl = choose_impl(impl, q.shape[1], kv.k.shape[1], only_attend_last_image, q.device)
    if impl == "reference":
        out = _attend_reference(q, kv, media_index, only_attend_last_image)
    elif impl == "flex":
        out = _attend_flex(q, kv, media_index, only_attend_last_image, block_mask)
    elif not only_attend_last_image:
        raise ValueError(f"impl={impl!r} supports only only_attend_last_image=True; use 'reference'")
    elif impl == "gather":
        out = _attend_gather(q, kv, media_index)
    elif impl == "segments":
        out = _attend_segments(q, kv, media_index)
    else:
        raise ValueError(f"unknown cross-attention impl {impl!r}")
    return out.masked_fill((media_index == 0)[:, :, None, None], 0.0)


class MaskedCrossAttention(nn.Module):
    """Text queries (pre-norm) attend to the visual tokens under the masking rule."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, head_dim: int, only_attend_last_image: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.only_attend_last_image = only_attend_last_image
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def project_media(self, visual: torch.Tensor) -> MediaKV:
        """visual (B, N, R, Dv) -> MediaKV of (B, N, R, h, d): computed once per prompt when decoding."""
        k, v = self.to_kv(visual).chunk(2, dim=-1)
        return MediaKV(k.unflatten(-1, (self.heads, self.head_dim)), v.unflatten(-1, (self.heads, self.head_dim)))

    def forward(self, x: torch.Tensor, kv: MediaKV, media_index: torch.Tensor, impl: XAttnImpl = "auto",
                block_mask: Any = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        q = self.to_q(self.norm(x)).unflatten(-1, (self.heads, self.head_dim))  # (B, T, h, d)
        out = masked_cross_attention(q, kv, media_index, only_attend_last_image=self.only_attend_last_image,
                                     impl=impl, block_mask=block_mask)
        return self.to_out(out.flatten(2))


class GatedResidualBlock(nn.Module):
    """x = x + tanh(a_attn)·attn(x, visual); x = x + tanh(a_ffw)·ffw(x). Gates start at 0: the LM is intact.

    The block variants (this paper's, IDEFICS's) differ in their attention and feed-forward modules only."""

    def __init__(self, attn: nn.Module, ffw: nn.Module, *, dim: int, gated: bool = True,
                 gate_type: str = "scalar") -> None:
        super().__init__()
        self.attn = attn
        self.ffw = ffw
        self.gated = gated
        if gated:
            gate_size = dim if gate_type == "vector" else 1  # broadcast over (B, T, D); IDEFICS's alpha_type
            self.attn_gate = nn.Parameter(torch.zeros(gate_size))
            self.ffw_gate = nn.Parameter(torch.zeros(gate_size))

    def project_media(self, visual: torch.Tensor) -> MediaKV:
        return self.attn.project_media(visual)

    def forward(self, x: torch.Tensor, kv: Optional[MediaKV], media_index: Optional[torch.Tensor],
                impl: XAttnImpl = "auto", block_mask: Any = None) -> torch.Tensor:
        """x (B, T, D), kv of (B, N, R, h, d) or None when the batch has no media, media_index (B, T) -> (B, T, D).
        block_mask: the flex block mask of this LM call (see `masked_cross_attention`)."""
        if kv is not None:
            attn = self.attn(x, kv, media_index, impl, block_mask)
            x = x + (self.attn_gate.tanh() * attn if self.gated else attn)
        # No media: the attention output is exactly zero for every token, so it is skipped, not computed.
        ffw = self.ffw(x)
        return x + (self.ffw_gate.tanh() * ffw if self.gated else ffw)


class GatedCrossAttentionBlock(GatedResidualBlock):
    """The paper's GATED XATTN-DENSE: masked cross-attention and a GELU feed-forward, each behind a tanh gate."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, head_dim: int, ffw_mult: int, gated: bool = True,
                 only_attend_last_image: bool = True, gate_type: str = "scalar") -> None:
        super().__init__(MaskedCrossAttention(dim=dim, dim_visual=dim_visual, heads=heads, head_dim=head_dim,
                                              only_attend_last_image=only_attend_last_image),
                         feed_forward(dim, ffw_mult), dim=dim, gated=gated, gate_type=gate_type)
