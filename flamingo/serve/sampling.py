"""Per-row token choice for a batch whose rows differ in settings: greedy rows take the argmax, sampled rows their own
temperature, top-p and random generator (a request's `seed` makes its sampled tokens repeat, whatever its
neighbours). Before either, a row's logits take its request's `logit_bias` and OpenAI's frequency and presence
penalties over the tokens it has generated (`logits[t] -= count[t] * frequency + (count[t] > 0) * presence`; the
prompt does not count, as in OpenAI's definition), then its grammar's mask when it has a response format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

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
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: Optional[int] = None  # give each generated token its log-probability and this many alternatives
    echo_logprobs: bool = False  # give the prompt's tokens theirs (raw completions with `echo`)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


def row_generator(params: SamplingParams, choice: int, device: torch.device) -> Optional[torch.Generator]:
    """The random generator of one choice of a sampled request (seeded: `seed + choice`), None when greedy."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:  # torch takes seeds of 64 bits (a negative one as its two's complement): any int wraps into them
        generator.manual_seed((params.seed + choice) % 2**64)
    return generator


def pick_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[Optional[torch.Generator]], suppress: Sequence[int],
                generated: Optional[Sequence[Sequence[int]]] = None,
                constraints: Optional[Sequence[Any]] = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): row b by `params[b]` with `generators[b]`, penalised by the tokens it has
    generated, `generated[b]` (none when omitted); `suppress` ids are never chosen (`<image>`: what `generate`
    suppresses); a row's constraint (serve/structured.py; None: free) leaves only the tokens its grammar allows."""
    logits = logits.to(torch.float32, copy=True)  # (B, V), the caller's stays as it was
    for b, p in enumerate(params):
        if p.adjusts_logits:
            adjust_logits(logits[b], p, generated[b] if generated is not None else ())
    if suppress:
        logits[:, list(suppress)] = -float("inf")
    for b, constraint in enumerate(constraints or ()):
        if constraint is not None:
            constraint.restrict(logits[b])
    tokens = logits.argmax(dim=-1)  # (B,)
    for b, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        # a tiny temperature must not make NaN: the logits shifted to a max of 0 (the same distribution) over a
        # temperature float32 keeps above 0 send all but the likeliest to -inf, never the likeliest to 0/0
        temperature = max(p.temperature, torch.finfo(logits.dtype).tiny)
        row = TemperatureLogitsWarper(temperature)(None, logits[b:b + 1] - logits[b].max())  # (1, V); HF's warpers
        if p.top_p < 1.0:
            row = TopPLogitsWarper(p.top_p)(None, row)
        tokens[b] = torch.multinomial(row[0].softmax(dim=-1), 1, generator=generator)[0]
    return tokens



def adjust_logits(logits: torch.Tensor, params: SamplingParams, generated: Sequence[int]) -> None:
    """Apply `params`' logit bias and frequency / presence penalties to one row's logits (V,), in place."""
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits[list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if generated and (params.frequency_penalty or params.presence_penalty):
        ids, counts = torch.tensor(list(generated), device=logits.device).unique(return_counts=True)
        logits[ids] -= counts.to(logits.dtype) * params.frequency_penalty + params.presence_penalty
