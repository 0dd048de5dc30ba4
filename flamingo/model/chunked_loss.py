"""Next-token cross-entropy from the LM's last hidden states, a chunk of the tokens at a time.

The full logits of a training batch are (B, T, V): at the gpu shape (8 x 256 tokens, a 32k vocabulary) 131 MB in
bf16 plus 262 MB for their fp32 copy, and as much again for their gradients, all alive from the end of the forward
into the backward. Here each chunk's logits exist only while its loss is computed (and again, recomputed, while its
gradient is): activation checkpointing of the head. The loss is the same mean over the labelled tokens, summed in
another order; the head runs once more per step (its recompute), a few percent of a step's matmuls. On the CPU
only the labelled tokens reach the chunks' head and either loss's log-softmax: at half the tokens labelled, half the
head's cost. On an accelerator every token does (selecting them there would be a host sync per step).

Both losses here are the sum over the labelled tokens divided by their count, at least 1: a batch without a labelled
token (a micro-batch or a rank whose rows are all prompt, image markers or padding) has loss 0 and a zero gradient,
not F.cross_entropy's 0 / 0 = NaN, whose NaN gradient would reach the whole step through any weight, even 0. Its
`loss_tokens` (0) tells it apart from a perfect prediction.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor,
                          logits_fn: Callable[[torch.Tensor], torch.Tensor], chunks: int) -> torch.Tensor:
    """Mean cross-entropy of `logits_fn(hidden)` against `targets` (-100 = ignored; none labelled: 0), the B·T tokens
    in `chunks` chunks: the logits of more than ceil(B·T / chunks) tokens never exist together.

    hidden (B, T, D): the input of the LM's output head; targets (B, T); logits_fn: (n, D) -> (n, V), a pure
    function of its input (it is called again in backward).
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on the tokens")
    recompute = torch.is_grad_enabled()  # the head's own trained rows may need gradients even if hidden does not
    total = hidden.new_zeros((), dtype=torch.float32)
    hidden, targets = _labelled_rows(hidden.flatten(0, -2), targets.flatten())  # (n, D), (n,)
    # chunk, not slices: its backward puts the chunks' gradients into one (n, D) tensor once
    for h, t in zip(hidden.chunk(chunks), targets.chunk(chunks)):
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, h, t, logits_fn, use_reentrant=False,
                                       preserve_rng_state=False)
        else:
            total = total + _chunk_loss_sum(h, t, logits_fn)
    return total / _labelled(targets)


def _labelled_rows(rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (B·T, ...) and targets (B·T,) -> those of the labelled tokens only, on the CPU: the head and the
    log-softmax of an unlabelled token (padding, prompt, `<image>`, a row's last) only feed a loss term of 0. On an
    accelerator all rows are kept: selecting them by a mask made there would be a host sync per step."""
    if rows.device.type != "cpu" or targets.device.type != "cpu":
        return rows, targets
    keep = (targets != -100).nonzero().squeeze(1)  # (n,)
    if keep.numel() == targets.numel():  # every token labelled: no copy
        return rows, targets
    return rows.index_select(0, keep), targets.index_select(0, keep)


def _labelled(targets: torch.Tensor) -> torch.Tensor:
    """() the count a mean over the labelled tokens divides by: theirs, at least 1 (none labelled: the sum, 0, stays
    0 and its gradient finite). A tensor, so no host sync."""
    return (targets != -100).sum().clamp(min=1)


def whole_logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same mean from logits (B, T, V) made whole (LMs whose head output is changed, and callers that keep the
    logits): (B, T, V) flattens to a view, so no copy but the fp32 one (and, on the CPU, the labelled rows')."""
    logits, labelled = _labelled_rows(logits.flatten(0, 1), targets.flatten())  # (n, V), (n,)
    total = F.cross_entropy(logits.float(), labelled, ignore_index=-100, reduction="sum")
    return total / _labelled(targets)


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor,
                    logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    logits = logits_fn(hidden)  # (n, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
