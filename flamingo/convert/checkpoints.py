"""A published checkpoint's directory and tensors, read without running pickle code; a converted model's backbones
written once for trained-only checkpoints."""

from __future__ import annotations

import glob
import os
from typing import Optional

import torch

from ..model.flamingo import Flamingo
from ..processing import FlamingoProcessor
from ..runtime.hub import local_dir

# what a conversion reads besides the weights: configs, tokenizer files (sentencepiece models, BPE merges and vocabs)
_METADATA = ["*.json", "tokenizer*", "*.model", "*.txt"]


def checkpoint_dir(source: str, what: str, *, revision: Optional[str] = None, allow_bin: bool = True) -> str:
    """`source` if it is a directory, else the local snapshot of the Hub repository it names, with its configs,
    tokenizer files and weights: its safetensors when it has them, else (when `allow_bin`) its `.bin` files, never
    both (a 7B repository holding both would be twice the download)."""
    directory = local_dir(source, what, revision=revision, allow_patterns=[*_METADATA, "*.safetensors"],
                          ignore_patterns=None)
    if not allow_bin or os.path.isdir(source) or glob.glob(os.path.join(directory, "*.safetensors")):
        return directory
    return local_dir(source, what, revision=revision, allow_patterns=[*_METADATA, "*.bin"], ignore_patterns=None)


def read_tensors(directory: str, *, allow_bin: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: its safetensors files, else (when `allow_bin`) its `.bin` files read
    weights-only."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    if not allow_bin:
        raise ValueError(f"no *.safetensors in {directory!r}: this checkpoint is read from safetensors only (no "
                         "pickle)")
    files = sorted(glob.glob(os.path.join(directory, "*.bin")))
    if not files:
        raise ValueError(f"no *.safetensors or *.bin weights in {directory!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"cannot read {f} as a weights-only torch file: {e}") from e
    return state


def write_backbones(model: Flamingo, processor: FlamingoProcessor, directory: str) -> None:
    """Save a converted model's vision tower and LM as HF directories (`directory/vision`, `directory/lm`) and point
    its config at them, so that `save_pretrained(..., trained_only=True)` checkpoints can share them."""
    vision, lm = os.path.join(directory, "vision"), os.path.join(directory, "lm")
    model.vision.save_pretrained(vision)
    processor.image_processor.save_pretrained(vision)
    model.lm.save_pretrained(lm)
    processor.tokenizer.save_pretrained(lm)
    model.config.vision_name_or_path, model.config.lm_name_or_path = os.path.abspath(vision), os.path.abspath(lm)
