"""Per-row token choice for a batch whose rows differ in settings: greedy rows take the argmax, sampled rows their own
temperature, top-p and random generator (a request's `seed` makes its sampled tokens repeat, whatever its
neighbours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What the OpenAI request asked for. temperature 0 = greedy (the argmax, as `generate(do_sample=False)`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def row_generator(params: SamplingParams, choice: int, device: torch.device) -> Optional[torch.Generator]:
    """The random generator of one choice of a sampled request (seeded: `seed + choice`), None when greedy."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed + choice)
    return generator


def pick_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[Optional[torch.Generator]], suppress: Sequence[int]) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): row b by `params[b]` with `generators[b]`; `suppress` ids are never chosen
    (`<image>`: what `generate` suppresses)."""
    logits = logits.to(torch.float32, copy=True)  # (B, V), the caller's stays as it was
    if suppress:
        logits[:, list(suppress)] = -float("inf")
    tokens = logits.argmax(dim=-1)  # (B,)
    for b, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = _top_p((logits[b] / p.temperature).softmax(dim=-1), p.top_p)  # (V,)
        tokens[b] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (always the most likely one)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each
    sorted_probs[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)
