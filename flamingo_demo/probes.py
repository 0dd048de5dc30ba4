"""Probes of the demo's LM: held-out perplexity, in-context copying, and recall of words from its context.

They read the LM without changing it or any random state (their generators are their own).
"""

from __future__ import annotations

import math
import os
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from .common import words_of
from .world import KINDS, NonsenseWords

PathLike = Union[str, os.PathLike]
Pairs = Union[PathLike, Sequence[tuple[np.ndarray, str]]]


def token_stream(lines: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Documents joined by EOS (GPT-2 style): `doc EOS doc EOS ...` as one long id tensor. A document may be longer
    than the LM's context (the tokenizer's model_max_length): the stream is cut into windows later, so the tokenizer's
    warning about long sequences is off (verbose=False)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(list(lines), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(lm: LlamaForCausalLM, stream: torch.Tensor, context: int, batch: int = 16) -> float:
    """exp(mean NLL) over non-overlapping windows of `context` tokens."""
    n = (len(stream) - 1) // context
    if n == 0:
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than one window of {context}")
    windows = stream[: n * context + 1]
    total, count = 0.0, 0
    for s in range(0, n, batch):
        idx = torch.arange(s, min(n, s + batch))[:, None] * context + torch.arange(context + 1)[None]
        chunk = windows[idx]  # (b, context + 1)
        logits = lm(input_ids=chunk[:, :-1]).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def copy_gain(lm: LlamaForCausalLM, vocab_size: int, length: int = 30, batch: int = 16, seed: int = 0) -> float:
    """In-context copying ("induction heads", Olsson et al. 2022): mean NLL of a random token sequence minus that of
    its verbatim repeat right after it, in nats per token. About 0 for an LM that cannot copy from its context; a
    Flamingo's in-context binding (the demo's binding task) rests on this ability of its frozen LM."""
    gen = torch.Generator().manual_seed(seed)
    low = min(256, vocab_size - 1)  # above the byte tokens where the vocabulary allows
    seq = torch.randint(low, vocab_size, (batch, length), generator=gen)
    ids = torch.cat([seq, seq], dim=1)  # (B, 2L)
    logprobs = lm(input_ids=ids).logits.float().log_softmax(-1)[:, :-1]  # (B, 2L - 1, V)
    nll = -logprobs.gather(-1, ids[:, 1:, None])[..., 0]  # (B, 2L - 1): position t predicts token t + 1
    return round(float(nll[:, : length - 1].mean() - nll[:, length:].mean()), 3)


def _word_scores(lm: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, context: str,
                 words: Sequence[str]) -> list[float]:
    """Log-probability of each ` word` as the continuation of `context` (summed over its tokens)."""
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    for word in words:
        cont = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        logits = lm(input_ids=torch.tensor([ids + cont])).logits  # (1, T, V)
        logprobs = logits[0, len(ids) - 1:-1].float().log_softmax(-1)  # (len(cont), V)
        scores.append(float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return scores


@torch.no_grad()
def word_recall(lm: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, words: Sequence[str], trials: int = 60,
                seed: int = 0) -> float:
    """In-context recall of fresh words, the LM skill the demo's binding task rests on: after `This is a A. This is a
    B. This is a A. This is a B. This is a`, is the best-scored of {A, B, C, D} (C, D unseen) A or B? Returns the
    fraction of `trials` where it is (chance 0.5; an LM that copies words from its context: near 1)."""
    if len(words) < 4:
        raise ValueError(f"word_recall needs at least 4 words, got {len(words)}")
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        w = [words[i] for i in rng.choice(len(words), 4, replace=False)]
        scores = _word_scores(lm, tokenizer, " ".join(f"This is a {w[j]}." for j in (0, 1, 0, 1)) + " This is a", w)
        hits += int(np.argmax(scores) < 2)
    return round(hits / trials, 3)


@torch.no_grad()
def assoc_recall(lm: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, words: Sequence[str], trials: int = 60,
                 seed: int = 0) -> float:
    """Content-keyed recall, the text form of the binding task: after `This is a circle A. This is a star B. This is a
    circle A. This is a star B. This is a circle` (or B's kind), is the word of that kind scored above the other?
    An LM that only recalls `a word after "This is a"` (word_recall) stays at chance 0.5; one with induction heads
    (match the kind, copy what followed it) gets near 1."""
    if len(words) < 2:
        raise ValueError(f"assoc_recall needs at least 2 words, got {len(words)}")
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        kinds = [KINDS[i] for i in rng.choice(len(KINDS), 2, replace=False)]
        w = [words[i] for i in rng.choice(len(words), 2, replace=False)]
        order, target = ((0, 1, 0, 1) if rng.random() < 0.5 else (1, 0, 1, 0)), int(rng.integers(2))
        context = " ".join(f"This is a {kinds[j]} {w[j]}." for j in order) + f" This is a {kinds[target]}"
        scores = _word_scores(lm, tokenizer, context, w)
        hits += int(np.argmax(scores) == target)
    return round(hits / trials, 3)


def fresh_words(corpus: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` nonsense words that occur nowhere in `corpus`: probes of in-context recall that no weight can know."""
    seen = {w for line in corpus for w in words_of(line)}
    return list(NonsenseWords(banned=sorted(seen)).sample_unique(np.random.default_rng([seed, 17]), n))
