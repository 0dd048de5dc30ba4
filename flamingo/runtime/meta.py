"""Modules built without memory for their parameters: the meta device, for parameters a caller assigns afterwards
(a conversion that loads every one of them from a checkpoint, no random init of what it replaces)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import nn


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules built inside hold their parameters on the meta device: no memory, and initialisers that run on shapes
    only. Buffers are made as usual, on the CPU: the non-persistent ones (rotary frequencies, position ids) are in no
    checkpoint, so the constructor's values are the ones to keep. Parameters a constructor draws itself
    (`nn.Parameter(torch.randn(d))`) are drawn, then moved. The caller gives each parameter its tensor
    (`load_state_dict(..., assign=True)`; `assign_tensors` in convert/checkpoints.py). Patches
    `nn.Module.register_parameter` for the process while inside: build nothing else in another thread meanwhile."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
