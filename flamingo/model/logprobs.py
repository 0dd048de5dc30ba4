"""Token log-probabilities: what a model's logits say of the tokens that came, and of their best alternatives.

Always of the model's own distribution (a log-softmax of its raw logits, in float32): not of the distribution a
sampler drew from after temperature, top-p, penalties or biases. So the same token at the same place has the same
log-probability whatever the request's sampling settings (the choice OpenAI's API and vLLM's default make).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprobs:
    """Log-probabilities of T tokens, each under the logits of the position before it."""

    logprobs: torch.Tensor  # (T,) float32: of each token
    top_ids: torch.Tensor  # (T, k) the k likeliest tokens at each position, likeliest first
    top_logprobs: torch.Tensor  # (T, k) float32

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def __getitem__(self, rows: slice) -> "TokenLogprobs":
        return TokenLogprobs(self.logprobs[rows], self.top_ids[rows], self.top_logprobs[rows])

    def top(self, k: int) -> "TokenLogprobs":
        """The same tokens with their positions' `k` likeliest alternatives only."""
        return TokenLogprobs(self.logprobs, self.top_ids[:, :k], self.top_logprobs[:, :k])

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.logprobs, self.top_ids, self.top_logprobs))

    @staticmethod
    def cat(parts: list["TokenLogprobs"]) -> "TokenLogprobs":
        return TokenLogprobs(torch.cat([p.logprobs for p in parts]), torch.cat([p.top_ids for p in parts]),
                             torch.cat([p.top_logprobs for p in parts]))

    def rows(self) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per token: its log-probability and its position's top (id, log-probability) pairs (plain Python)."""
        lps, ids, tops = self.logprobs.tolist(), self.top_ids.tolist(), self.top_logprobs.tolist()
        return [(lp, list(zip(i, t))) for lp, i, t in zip(lps, ids, tops)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> TokenLogprobs:
    """logits (T, V) of the positions before tokens (T,) -> their log-probabilities and each position's `top`
    likeliest tokens (top = 0: none)."""
    if logits.ndim != 2 or tokens.shape != logits.shape[:1]:
        raise ValueError(f"logits (T, V) and tokens (T,) expected, got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    lp = logits.float().log_softmax(dim=-1)  # (T, V)
    chosen = lp.gather(1, tokens.to(lp.device)[:, None])[:, 0]  # (T,)
    values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1) if top > 0 else (lp[:, :0], lp[:, :0].long())  # (T, k)
    return TokenLogprobs(chosen.cpu(), ids.cpu(), values.cpu())
