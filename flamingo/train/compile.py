"""Regional compilation of the training step (`train.compile`): `torch.compile` applied from outside the model.

What is compiled, each region once per class (all layers of a class share their graphs, so compile time is about
one layer's, not the model's):
- the LM's decoder layers and the vision tower's encoder layers: their `forward`, not their `__call__`. The
  Flamingo pre-hook on a decoder layer runs eagerly around the compiled forward: it reads the call's media context
  (a Python object made per call) and would make a traced hook guard on it and recompile per layer;
- the GATED XATTN-DENSE blocks, called by that hook with tensors only (visual K/V, media index, and the flex block
  mask of the call, made eagerly by the hook: `MediaContext.flex_mask`);
- the Perceiver Resampler.
The rest (embedding, output head, loss, the media selection of `encode_media`) stays eager: one op each.

Shapes: `dynamic=None` is torch's automatic mode: a region compiles for the first shapes it sees and once more with
symbolic sizes when a size changes, so a run compiles a handful of graphs. Padding buckets (`buckets.py`) round
the text length and the number of media per row up, so that shapes repeat. `dynamic=False` compiles one graph per
shape: use it only with buckets that give few shapes (torch gives up past `recompile_limit` and runs eagerly).

Turn it off (`train.compile: false`, the default) for short runs, where compiling costs more than it saves (docs/
training.md has the measured compile times), and for debugging. The model keeps its module tree, parameters and
state-dict keys; generation on a model compiled here runs the compiled layers too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model.backbones import find_decoder_layers
from ..model.flamingo import Flamingo


def compile_regions(model: Flamingo, *, dynamic: Optional[bool] = None, vision: bool = True,
                    backend: str = "inductor") -> list[str]:
    """Compile the repeated regions of `model` in place; returns their module paths (compiled on first use).
    backend: torch.compile's ("aot_eager" traces forward and backward like inductor but generates no kernels)."""
    options = dict(dynamic=dynamic, backend=backend)

    def compile_forward(module: nn.Module) -> None:  # its hooks (ours on decoder layers) stay eager around it
        module.forward = torch.compile(module.forward, **options)  # an instance attribute: class and keys unchanged

    compiled = []
    layers_path = model.decoder_layers_path
    layers = model.lm.get_submodule(layers_path)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError("compiling needs the LM's layers without activation checkpointing: HF checkpoints inside the "
                         "layer's forward with a context function (ours, which re-installs the media context for "
                         "the recompute) that torch.compile cannot trace; use train.compile or "
                         "train.gradient_checkpointing, not both")
    for i, layer in enumerate(layers):
        compile_forward(layer)
        compiled.append(f"lm.{layers_path}.{i}")
    if vision:
        tower_path = find_decoder_layers(model.vision)
        for i, layer in enumerate(model.vision.get_submodule(tower_path)):
            compile_forward(layer)
            compiled.append(f"vision.{tower_path}.{i}")
    for i, block in enumerate(model.xattn):
        block.compile(**options)  # no hooks of ours on a block: its whole call is compiled
        compiled.append(f"xattn.{i}")
    model.resampler.compile(**options)
    compiled.append("resampler")
    return compiled
