"""Grow the frozen backbones of the mini demo on CPU: a byte-level BPE tokenizer (tokenizer.py), a contrastively
pretrained CLIP vision tower (tower.py) and a small Llama (lm.py, probed by probes.py), each saved as an ordinary
Hugging Face directory.

    grow_tokenizer(corpus, vocab_size, out_dir)          -> PreTrainedTokenizerFast (saved in out_dir)
    grow_vision(pairs, out_dir, heldout=..., size=...)   -> {"dir", "wall_s", "retrieval_top1", ...}
    grow_lm(corpus, tokenizer, out_dir, heldout=...)     -> {"dir", "wall_s", "heldout_ppl", ...}
    grow_backbones(manifest, out_dir, size)              -> all three, plus out_dir/backbones.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .common import corpus_lines, resolve_size
from .lm import grow_lm
from .sizes import MiniSize
from .tokenizer import grow_tokenizer
from .tower import grow_vision

PathLike = Union[str, os.PathLike]
Pairs = Union[PathLike, Sequence[tuple[np.ndarray, str]]]

def grow_backbones(manifest: Union[dict, PathLike], out_dir: PathLike, size: Union[str, MiniSize, None] = None,
                   seed: int = 0, threads: Optional[int] = 2, progress: bool = True) -> dict:
    """Grow the three backbones from a written world (its manifest dict or root/world.json) into
    out_dir/{tokenizer,vision,lm}; write and return out_dir/backbones.json.

    threads: torch threads while training (restored after). On a machine shared with other busy processes, 1 is
    far faster than 2 (OpenMP threads spin-wait for a busy core)."""
    if not isinstance(manifest, dict):
        path = Path(manifest)
        with open(path / "world.json" if path.is_dir() else path) as f:
            manifest = json.load(f)
    size = resolve_size(size if size is not None else manifest.get("size"))
    out = Path(out_dir)
    t0 = time.perf_counter()
    tokenizer = grow_tokenizer(manifest["corpus"]["train"], size.vocab_size, out / "tokenizer",
                               model_max_length=size.lm_context, progress=progress)
    report: dict[str, Any] = {"tokenizer": {"dir": str(out / "tokenizer"), "vocab_size": len(tokenizer),
                                            "wall_s": round(time.perf_counter() - t0, 2)}}
    report["vision"] = grow_vision(manifest["data"]["pairs"]["path"], out / "vision",
                                   heldout=manifest["eval"]["retrieval"]["path"], size=size, seed=seed,
                                   threads=threads, progress=progress)
    binding_words = Path(manifest.get("eval", {}).get("binding", {}).get("dir", "")) / "classes.json"
    probe_words = json.loads(binding_words.read_text()) if binding_words.is_file() else None
    corpus: Union[str, list[str]] = manifest["corpus"]["train"]
    if manifest["corpus"].get("induction"):  # mixed into the world's text in a seeded order
        corpus = corpus_lines(corpus) + corpus_lines(manifest["corpus"]["induction"])
        corpus = [corpus[i] for i in np.random.default_rng([seed, 11]).permutation(len(corpus))]
    report["lm"] = grow_lm(corpus, tokenizer, out / "lm", heldout=manifest["corpus"]["heldout"],
                           size=size, seed=seed, threads=threads, progress=progress, probe_words=probe_words)
    report["wall_s"] = round(sum(report[k]["wall_s"] for k in ("tokenizer", "vision", "lm")), 2)
    with open(out / "backbones.json", "w") as f:
        json.dump(report, f, indent=1)
    return report
