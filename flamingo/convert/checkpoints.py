"""A published checkpoint's tensors, read without running pickle code (its directory: `runtime.hub.local_dir`)."""

from __future__ import annotations

import glob
import os

import torch


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
