"""The demo's byte-level BPE tokenizer, grown on the world's text and saved as an HF tokenizer."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from .common import EOS, corpus_lines

PathLike = Union[str, os.PathLike]
Pairs = Union[PathLike, Sequence[tuple[np.ndarray, str]]]


def grow_tokenizer(corpus: Union[PathLike, Sequence[str]], vocab_size: int, out_dir: PathLike, *,
                   model_max_length: Optional[int] = None, progress: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus` (a text file, one document per line, or a list of strings), with
    `<|endoftext|>` as BOS/EOS and no pad token (`from_backbones` adds pad, `<image>`, `<|endofchunk|>`).
    `model_max_length`: the LM's context, saved with the tokenizer as a hub LM's tokenizer has it, so that the
    Flamingo processor refuses longer prompts and the evaluation harness skips (and counts) them."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    with tqdm(total=3, desc="tokenizer", leave=False, disable=not progress) as bar:
        lines = corpus_lines(corpus)
        bar.update()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(lines, trainer=trainer)
        bar.update()
        extra = {} if model_max_length is None else {"model_max_length": model_max_length}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None,
                                            **extra)
        tokenizer.save_pretrained(str(out_dir))
        bar.update()
    return tokenizer
