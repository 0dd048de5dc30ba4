"""A device the user named (`--device`), checked before any model is built on it."""

from __future__ import annotations

from typing import Union

import torch


def check_device(requested: Union[str, torch.device], option: str = "--device") -> torch.device:
    """`requested` as a torch device, or a ValueError that says why it cannot be used here: a name torch does not know
    (`gpu`), CUDA on a torch built without it or a machine without a GPU, a GPU index past the machine's count, MPS
    without Metal, `meta` (no values), any other type whose torch backend is missing or reports itself unavailable
    (xla, hpu, xpu without its device). Called first by every command that takes `--device`, and by the training
    config for `train.device` (`option`: the setting the messages name): torch would fail later, deep inside
    `model.to`, after the model was loaded (or, for a large model built on the CPU instead, not at all)."""
    where = f"{option} {requested!r}"
    cpu = f"{option} cpu" if option.startswith("-") else f"{option}=cpu"  # `--device cpu`, `train.device=cpu`
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{where}: not a device torch knows ({e}); e.g. cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch has no CUDA (a CPU build)" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"{where}: {why}; use {cpu}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{where}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{where}: MPS (Apple Metal) is not available here; use {cpu}")
    elif device.type == "meta":
        raise ValueError(f"{where}: the meta device holds shapes, not values; nothing can run on it")
    elif device.type != "cpu":  # xpu, xla, hpu, ...: torch names many types that this build or machine lacks
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise ValueError(f"{where}: this torch has no usable {device.type} backend here; use {cpu} (or cuda, "
                             "mps)")
    return device
