"""Optimizer and scheduler states without pickle: nested dicts/lists of tensors and numbers <-> a JSON skeleton +
plain tensors for safetensors.

`encode(tree, prefix)` replaces each tensor by a reference `{"__tensor__": key}` and returns the tensors by key;
`decode(skeleton, tensors)` puts them back. What JSON cannot say is marked: tuples (`{"__tuple__": [...]}`, e.g.
AdamW's betas) and dicts with non-string keys (`{"__items__": [[key, value], ...]}`, e.g. the optimizer's state by
parameter index). torchao's 8-bit optimizer states (`OptimState8bit`, a tensor subclass) are stored as their plain
parts: uint8 `codes`, fp32 block `scale` and the 256-entry `qmap`, under `key/codes`, `key/scale`, `key/qmap`, and
rebuilt on decode, so the same bytes come back and a resumed run continues bit-identically.
"""

from __future__ import annotations

from typing import Any

import torch

_TENSOR, _STATE8, _TUPLE, _ITEMS = "__tensor__", "__optim_state_8bit__", "__tuple__", "__items__"
_PARTS8 = ("codes", "scale", "qmap")


def _is_state8(value: Any) -> bool:
    return type(value).__name__ == "OptimState8bit" and all(hasattr(value, p) for p in _PARTS8)


def encode(tree: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, tensors by key) of `tree`; keys start with `prefix` and are unique."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # storages already written: safetensors refuses two tensors sharing one

    def put(key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor

    def walk(node: Any, key: str) -> Any:
        if _is_state8(node):
            for part in _PARTS8:
                put(f"{key}/{part}", getattr(node, part))
            return {_STATE8: key, "signed": bool(node.signed), "dtype": str(node.dtype).removeprefix("torch.")}
        if isinstance(node, torch.Tensor):
            if type(node) is not torch.Tensor and not isinstance(node, torch.nn.Parameter):
                raise TypeError(f"cannot store {type(node).__name__} at {key!r} without pickle")
            put(key, node)
            return {_TENSOR: key}
        if isinstance(node, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in node):
                return {k: walk(v, f"{key}/{k}") for k, v in node.items()}
            if not all(isinstance(k, (str, int)) for k in node):
                raise TypeError(f"dict keys at {key!r} must be str or int: {list(node)[:5]}")
            return {_ITEMS: [[k, walk(v, f"{key}/{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {_TUPLE: [walk(v, f"{key}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{key}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} at {key!r} without pickle")

    return walk(tree, prefix), tensors


def decode(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The tree `encode` was given (tensors on the CPU)."""
    if isinstance(skeleton, list):
        return [decode(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if _TENSOR in skeleton:
        return tensors[skeleton[_TENSOR]]
    if _STATE8 in skeleton:
        from torchao.optim.subclass_8bit import OptimState8bit

        key = skeleton[_STATE8]
        codes, scale, qmap = (tensors[f"{key}/{part}"] for part in _PARTS8)
        return OptimState8bit(codes, scale, qmap, skeleton["signed"], dtype=getattr(torch, skeleton["dtype"]))
    if _TUPLE in skeleton:
        return tuple(decode(v, tensors) for v in skeleton[_TUPLE])
    if _ITEMS in skeleton:
        return {k: decode(v, tensors) for k, v in skeleton[_ITEMS]}
    return {k: decode(v, tensors) for k, v in skeleton.items()}
