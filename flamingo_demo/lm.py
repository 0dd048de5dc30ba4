"""The demo's causal LM: a small `LlamaForCausalLM` trained on the world's text (plus induction documents in
the `binding` size), probed for in-context recall as it trains.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .common import corpus_lines, lr_at, resolve_size
from .probes import assoc_recall, copy_gain, fresh_words, perplexity, token_stream, word_recall
from .sizes import MiniSize

PathLike = Union[str, os.PathLike]
Pairs = Union[PathLike, Sequence[tuple[np.ndarray, str]]]


def grow_lm(corpus: Union[PathLike, Sequence[str]], tokenizer: Union[PathLike, PreTrainedTokenizerFast],
            out_dir: PathLike, *, heldout: Union[PathLike, Sequence[str], None] = None,
            size: Union[str, MiniSize, None] = None, seed: int = 0, threads: Optional[int] = 2,
            progress: bool = True, probe_words: Optional[Sequence[str]] = None) -> dict:
    """Train a small `LlamaForCausalLM` on `corpus` (random windows of the EOS-joined documents); save it and the
    tokenizer in `out_dir`. Returns {"dir", "wall_s", "steps", "tokens_seen", "final_loss", "heldout_ppl",
    "copy_gain"}, "induction_step" / "probe_every" / "max_steps" when the size probes for an early stop
    (`lm_probe_every`), and, given `probe_words` (fresh words, e.g. the binding task's), "word_recall" and
    "assoc_recall"."""
    size, start = resolve_size(size), time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = _train_lm(corpus, tokenizer, out_dir, heldout, size, seed, progress, probe_words)
    finally:
        torch.set_num_threads(previous_threads)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def _train_lm(corpus: Union[PathLike, Sequence[str]], tokenizer: Union[PathLike, PreTrainedTokenizerFast],
              out_dir: PathLike, heldout: Union[PathLike, Sequence[str], None], size: MiniSize, seed: int,
              progress: bool, probe_words: Optional[Sequence[str]] = None) -> dict:
    torch.manual_seed(seed)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
    lines = corpus_lines(corpus)
    stream = token_stream(lines, tokenizer)
    ctx = size.lm_context
    if len(stream) <= ctx + 1:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one window of {ctx}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.lm_hidden, intermediate_size=size.lm_intermediate,
                         num_hidden_layers=size.lm_layers, num_attention_heads=size.lm_heads,
                         num_key_value_heads=size.lm_heads, max_position_embeddings=ctx, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    lm = LlamaForCausalLM(config)
    optim = torch.optim.AdamW(lm.parameters(), lr=size.lm_lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    fresh = fresh_words(lines, 64, seed) if size.lm_probe_every > 0 else []
    steps, stop, induction_step = 0, size.lm_steps, None
    lm.train()
    bar = tqdm(total=size.lm_steps, desc="language model", leave=False, disable=not progress)
    while steps < stop:
        for group in optim.param_groups:
            group["lr"] = lr_at(steps, size.lm_steps, size.lm_lr, schedule=size.lm_schedule)
        starts = torch.randint(0, len(stream) - ctx - 1, (size.lm_batch,), generator=gen)
        chunk = stream[starts[:, None] + torch.arange(ctx + 1)[None]]  # (B, ctx + 1)
        logits = lm(input_ids=chunk[:, :-1]).logits  # (B, ctx, V)
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optim.step()
        loss_value = loss.item()
        steps += 1
        bar.update(1)
        if induction_step is None and size.lm_probe_every > 0 and steps % size.lm_probe_every == 0:
            lm.eval()  # no dropout in this LM and no random state drawn: the probe leaves the run's bits unchanged
            if assoc_recall(lm, tokenizer, fresh) >= size.lm_induction_recall:
                induction_step, stop = steps, min(size.lm_steps, steps + size.lm_steps_after_induction)
            lm.train()
    bar.close()
    lm.eval()
    result: dict[str, Any] = {"dir": str(out_dir), "steps": steps, "final_loss": round(loss_value, 4),
                              "tokens_seen": steps * size.lm_batch * ctx, "corpus_tokens": len(stream),
                              "params": sum(p.numel() for p in lm.parameters()), "context": ctx}
    if size.lm_probe_every > 0:  # the step whose probe first found in-context recall (None: not within lm_steps)
        result.update(induction_step=induction_step, probe_every=size.lm_probe_every, max_steps=size.lm_steps)
    if heldout is not None:
        result["heldout_ppl"] = round(perplexity(lm, token_stream(corpus_lines(heldout), tokenizer), ctx), 3)
    result["copy_gain"] = copy_gain(lm, len(tokenizer), length=min(30, ctx // 2))
    if probe_words is not None and len(probe_words) >= 4:
        result["word_recall"] = word_recall(lm, tokenizer, probe_words)
        result["assoc_recall"] = assoc_recall(lm, tokenizer, probe_words)
    lm.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return result
