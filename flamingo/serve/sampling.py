"""Per-row token choice for a batch whose rows differ in settings: greedy rows take the argmax, sampled rows their own
temperature, top-p and random generator (a request's `seed` makes its sampled tokens repeat, whatever its
neighbours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper


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
        row = TemperatureLogitsWarper(p.temperature)(None, logits[b:b + 1])  # (1, V); transformers' own warpers
        if p.top_p < 1.0:
            row = TopPLogitsWarper(p.top_p)(None, row)
        tokens[b] = torch.multinomial(row[0].softmax(dim=-1), 1, generator=generator)[0]
    return tokens

