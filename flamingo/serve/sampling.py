"""Per-row token choice for a batch whose rows differ in settings: greedy rows take the argmax, sampled rows their own
temperature, top-p and random generator (a request's `seed` makes its sampled tokens repeat, whatever its
neighbours). Before either, a row's logits take its request's `logit_bias` and OpenAI's frequency and presence
penalties over the tokens it has generated (`logits[t] -= count[t] * frequency + (count[t] > 0) * presence`; the
prompt does not count, as in OpenAI's definition), then its grammar's mask when it has a response format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from ..model.generation import tempered_logits

# the likeliest tokens searched, in turn, for a row's top-p nucleus before sorting them all: a language model's is
# nearly always among its first 256; a flatter row's (a high temperature) among a few thousand, which a top-k finds
# in a quarter of a full sort's time at V = 32000
TOP_P_WIDTHS = (256, 4096)


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
    else:  # torch takes seeds of 64 bits (a negative one as its two's complement): any int wraps into them. A CPU
        # generator (mt19937) keeps the low 32 of them (docs/serve.md); a fold of the high ones would collide too
        generator.manual_seed((params.seed + choice) % 2**64)
    return generator


def pick_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[Optional[torch.Generator]], suppress: Sequence[int],
                generated: Optional[Sequence[Union[Sequence[int], torch.Tensor]]] = None,
                constraints: Optional[Sequence[Any]] = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): row b by `params[b]` with `generators[b]`, penalised by the tokens it has
    generated, `generated[b]` (none when omitted): their list, or their counts per id (V,), which the engine keeps so
    that a step costs O(V) whatever the answer's length; `suppress` ids are never chosen (`<image>`: what `generate`
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
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        rows = logits if len(sampled) == len(params) else logits.index_select(0, index)  # (S, V)
        temperature = torch.tensor([params[b].temperature for b in sampled], dtype=logits.dtype,
                                   device=logits.device)[:, None]  # (S, 1)
        # `generate`'s rule: a tiny temperature tends to greedy, never to NaN
        probs = tempered_logits(rows, temperature).softmax(dim=-1)  # (S, V)
        tokens[index] = draw_tokens(probs, [params[b].top_p for b in sampled], [generators[b] for b in sampled])
    return tokens


def draw_tokens(probs: torch.Tensor, top_p: Sequence[float],
                generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """probs (S, V) -> one token per row (S,), drawn from row j's top-p nucleus (the smallest set of likeliest
    tokens whose mass reaches `top_p[j]`: HF's TopP warper's set) by inverse CDF with one uniform from
    `generators[j]`. A row's draw reads its own probabilities and uniform only, so a seeded row repeats whatever its
    neighbours (their top-p included). A zero-probability token is never drawn."""
    uniform = torch.cat([torch.rand(1, generator=g, device=probs.device, dtype=probs.dtype)
                         for g in generators])[:, None]  # (S, 1), one draw per row and step
    nucleus = [j for j, p in enumerate(top_p) if p < 1.0]
    if not nucleus:
        return _draw_cdf(probs, uniform)[:, 0]
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)  # (S,)
    plain = [j for j, p in enumerate(top_p) if p >= 1.0]
    if plain:
        index = torch.tensor(plain, device=probs.device)
        tokens[index] = _draw_cdf(probs.index_select(0, index), uniform.index_select(0, index))[:, 0]
    if _sorts_all(probs):  # on a device: one sort of the nucleus rows, no host sync before the caller's
        index = torch.tensor(nucleus, device=probs.device)
        tokens[index] = _draw_sorted(probs.index_select(0, index), [top_p[j] for j in nucleus],
                                     uniform.index_select(0, index))
    else:
        for j in nucleus:
            tokens[j] = _draw_nucleus(probs[j], top_p[j], uniform[j])
    return tokens


def _sorts_all(probs: torch.Tensor) -> bool:
    """Whether the nucleus rows are drawn by one sort of them all (`_draw_sorted`): on a device, where the CPU's
    per-row top-k shortcut would read a mass back to the host for each row."""
    return probs.device.type != "cpu"


def _draw_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs (S, K) >= 0, uniform (S, 1) in [0, 1) -> (S, 1): the index whose CDF step holds uniform x mass. The
    point stays below the total mass, so the step found has positive width: a zero-probability index is never hit."""
    cdf = probs.cumsum(dim=-1)  # (S, K)
    total = cdf[:, -1:]  # (S, 1)
    point = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).clamp(max=probs.shape[-1] - 1)


def _draw_nucleus(row: torch.Tensor, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """One row's probs (V,) -> a token () from its top-p nucleus, found by a top-k of each of `TOP_P_WIDTHS` in turn
    (the first whose mass reaches top_p holds it), else by sorting the whole row."""
    found = None
    for width in TOP_P_WIDTHS:
        if width >= row.numel():
            break
        values, ids = row.topk(width)  # (K,), descending
        if values.sum() >= top_p:
            found = values, ids
            break
    values, ids = found or row.sort(descending=True)
    before = values.cumsum(0) - values  # mass of the likelier tokens
    keep = int((before < top_p).sum().clamp(min=1))
    return ids[_draw_cdf(values[None, :keep], uniform[None])[0, 0]]


def _draw_sorted(probs: torch.Tensor, top_p: Sequence[float], uniform: torch.Tensor) -> torch.Tensor:
    """`draw_tokens` for its nucleus rows (top_p < 1) at once, without a host sync: each row sorted, its tokens past
    the nucleus (and those of probability 0) masked to 0, then inverse CDF over the sorted row."""
    values, ids = probs.sort(dim=-1, descending=True)  # (S, V)
    limit = torch.tensor(list(top_p), dtype=probs.dtype, device=probs.device)[:, None]  # (S, 1)
    keep = ((values.cumsum(dim=-1) - values) < limit) & (values > 0)  # (S, V), a prefix of each row
    keep[:, 0] = True
    pick = _draw_cdf(values.masked_fill(~keep, 0.0), uniform)  # (S, 1)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)
    return ids.gather(-1, pick)[:, 0]


def adjust_logits(logits: torch.Tensor, params: SamplingParams,
                  generated: Union[Sequence[int], torch.Tensor]) -> None:
    """Apply `params`' logit bias and frequency / presence penalties to one row's logits (V,), in place; `generated`:
    the row's generated tokens, or their counts per id (V,)."""
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits[list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if not (params.frequency_penalty or params.presence_penalty):
        return
    if isinstance(generated, torch.Tensor):  # counts (V,): O(V) whatever the answer's length
        counts = generated.to(device=logits.device, dtype=logits.dtype)
        if params.frequency_penalty:
            logits.sub_(counts, alpha=params.frequency_penalty)
        if params.presence_penalty:  # counts are whole numbers: clamped to 1, the tokens present
            logits.sub_(counts.clamp(max=1.0), alpha=params.presence_penalty)
    elif generated:
        ids, counts = torch.tensor(list(generated), device=logits.device).unique(return_counts=True)
        logits[ids] -= counts.to(logits.dtype) * params.frequency_penalty + params.presence_penalty
