"""Quantized frozen backbones: the frozen LM's and vision tower's linear weights stored in int8, int4 or nf4.

Weight-only quantization with torchao (the `memory` extra): activations, the trained parameters (resampler,
cross-attention blocks, the added token rows, LoRA adapters) and every non-linear backbone tensor (embeddings, norms,
convolutions) keep their dtype. Only `nn.Linear` layers inside `model.vision` / `model.lm` whose weight does not train
are touched, each replaced by a `QuantizedLinear` in the same place (same attribute names and state-dict keys); the
LM's output head stays as it is (Flamingo hooks it for the added tokens' logits).

Modes (`FlamingoConfig.quantize_frozen`):
- "int8": per-output-channel symmetric int8 (torchao `Int8WeightOnlyConfig`), CPU and CUDA.
- "int4": groups of 128 input channels (64 or 32 when a layer's width needs it), asymmetric int4 packed two to a
  byte for CUDA's tinygemm kernel (torchao `Int4WeightOnlyConfig`, tile_packed_to_4d): CUDA with compute capability
  >= 8.0 only; torchao packs int4 for no CPU kernel here, so on the CPU it is an error that points to nf4.
- "nf4": QLoRA's 4-bit NormalFloat, blocks of 64 with double-quantized scales (torchao `NF4Tensor`), CPU and CUDA.
Gradients flow through int8 and nf4 to the activations, so the trained blocks train on a quantized frozen LM; the
backward keeps only the quantized weight and dequantizes it per layer (`_FrozenLinear`). int4's kernel has no
backward: it is for inference.

Quantize after the model is on its device (`Flamingo.from_pretrained(..., device=)` and the trainer do): torchao's
int4 layout belongs to the device it was packed for. Quantizing is lossy and one-way: a model with quantized
backbones saves trained-only checkpoints (the backbones are re-loaded by name and quantized again on load).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QUANTIZE_MODES

if TYPE_CHECKING:
    from .flamingo import Flamingo

INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides a layer's input width
NF4_BLOCK_SIZE = 64  # values per absmax scale (QLoRA's)
NF4_SCALER_BLOCK = 256  # scales per double-quantization block (QLoRA's); smaller where a layer has fewer blocks


class QuantizationUnavailable(ValueError):
    """The mode cannot run here (library missing, device without a kernel): a bad option value for this machine."""


def _torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise QuantizationUnavailable("quantize_frozen needs torchao: pip install 'flamingo-vlm[memory]'") from e


def check_available(mode: str, device: torch.device | str) -> None:
    """Raise a clear error when `mode` cannot run on `device`; return quietly when it can."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize_frozen must be one of {', '.join(QUANTIZE_MODES)}; got {mode!r}")
    if mode == "none":
        return
    _torchao()
    device = torch.device(device)
    if mode == "int4":
        if device.type != "cuda":
            raise QuantizationUnavailable(f"quantize_frozen=int4 packs weights for CUDA's int4 kernel; there is none "
                                          f"for {device.type} here: use nf4 (also 4-bit) or int8")
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            raise QuantizationUnavailable(f"quantize_frozen=int4 needs CUDA compute capability >= 8.0 (tinygemm); "
                                          f"{torch.cuda.get_device_name(device)} has {major}.x: use nf4 or int8")


def is_quantized(t: torch.Tensor) -> bool:
    """Whether `t` is a torchao quantized tensor (a tensor subclass holding packed data and scales)."""
    return type(t).__module__.startswith("torchao.")


def quantized_mode(model: "Flamingo") -> str:
    """The mode the backbones are actually stored in ("none" when no weight is quantized)."""
    for _, _, linear in _linears(model):
        if is_quantized(linear.weight):
            return _mode_of(linear.weight)
    return "none"


def _mode_of(weight: torch.Tensor) -> str:
    name = type(weight).__name__
    return "nf4" if name.startswith("NF4") else "int4" if name.startswith("Int4") else "int8"


# nn.Linear subclasses of transformers whose forward is F.linear's (x @ W.T + b), so that a QuantizedLinear computes
# what they do: Falcon's projections
PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


def _packable(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, QuantizedLinear) or type(module).__name__ in PLAIN_LINEAR_SUBCLASSES


def _linears(model: "Flamingo") -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """The frozen linear layers of the vision tower and the LM, as (parent module, attribute name, layer). LoRA's
    adapters are never among them, frozen or not (they keep their dtype); nor are `nn.Linear` subclasses other than
    `PLAIN_LINEAR_SUBCLASSES` (`skipped_linears`)."""
    for parent, name, module in _frozen_linears(model):
        if _packable(module):
            yield parent, name, module


def skipped_linears(model: "Flamingo") -> list[str]:
    """The frozen layers `quantize_frozen` leaves in their dtype because their class subclasses `nn.Linear` (e.g.
    `nn.MultiheadAttention`'s out_proj, another library's quantized linear): their forward may not be a plain
    `F.linear`, so replacing them by a `QuantizedLinear` could change what they compute. As "vision.<path>" /
    "lm.<path>" (class name)."""
    names = {id(m): f"{side}.{q}" for side, backbone in (("vision", model.vision), ("lm", model.lm))
             for q, m in backbone.named_modules()}
    return [f"{names[id(module)]} ({type(module).__name__})" for _, _, module in _frozen_linears(model)
            if not _packable(module)]


def _frozen_linears(model: "Flamingo") -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """Every frozen `nn.Linear` (subclasses included) of the backbones but LoRA's and the LM's output head."""
    head = model.lm.get_output_embeddings()
    for backbone in (model.vision, model.lm):
        for qualified, parent in backbone.named_modules():
            if ".lora_" in f".{qualified}":  # an adapter's container (lora_A, lora_B, ...) or inside one
                continue
            for name, module in parent.named_children():
                if not isinstance(module, nn.Linear) or module.weight.requires_grad:
                    continue
                if module is head:  # Flamingo's hook on it fills the added tokens' logits; tied or not, it stays
                    continue
                yield parent, name, module


def has_frozen_conv1d(model: "Flamingo") -> bool:
    """Whether the LM has frozen transformers `Conv1D` projections (GPT-2's): `quantize_frozen` packs `nn.Linear`
    only, so they stay in float and the memory mode saves less than asked."""
    return any(type(m).__name__ == "Conv1D" and not m.weight.requires_grad for m in model.lm.modules())


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with a frozen quantized W: backward needs only W, so it keeps W as stored and dequantizes it
    again for the input's gradient. (torchao's own linear lets autograd keep a dequantized copy of W per layer until
    backward: a quantized LM then took more memory in a training step than a bf16 one.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype  # a frozen parameter: never changed in place
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight = _dequantize(ctx.weight, grad.dtype)  # (out, in)
        return (grad @ weight).to(ctx.x_dtype), None, None  # (..., out) @ (out, in) -> (..., in)


def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _mode_of(weight) == "int4":
        raise QuantizationUnavailable("quantize_frozen=int4 runs forward only (torchao's tinygemm kernel has no "
                                      "backward): train with nf4 (also 4-bit) or int8")
    if _mode_of(weight) == "nf4":
        return weight.to(dtype)
    return weight.dequantize(dtype)


class QuantizedLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight is a torchao quantized tensor (same attribute names, so the same state-dict
    keys, and PEFT still wraps it as a linear layer). Under autograd its input gradient comes from `_FrozenLinear`."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def __deepcopy__(self, memo: dict[int, Any]) -> "QuantizedLinear":
        """`copy.deepcopy` with the weight copied as stored. (An NF4 weight's own deepcopy, torchao's `clone`,
        quantizes its dequantized values again with the default 256 scales per block, which fails on a layer given
        fewer, `_quantize_weight`.)"""
        if id(self.weight) not in memo:
            memo[id(self.weight)] = nn.Parameter(_copy_stored(self.weight.data), requires_grad=False)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenLinear.apply(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        # the dtype a float linear layer gives (torchao's int8 promotes to its fp32 scales' dtype, which doubled the
        # LM's saved activations in a bf16 training step)
        kind = x.device.type
        return y.to(torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype)


def _copy_stored(weight: torch.Tensor) -> torch.Tensor:
    """A copy of a quantized weight: NF4's inner tensors cloned under the same block sizes (bit-equal); other
    formats by their own deepcopy."""
    if _mode_of(weight) != "nf4":
        return copy.deepcopy(weight)
    names, meta = weight.__tensor_flatten__()
    inner = {name: getattr(weight, name).clone() for name in names}
    return type(weight).__tensor_unflatten__(inner, meta, weight.size(), weight.stride())


def cast_frozen(model: "Flamingo", dtype: torch.dtype) -> None:
    """Store the backbones' frozen parameters in `dtype` (e.g. bf16: half their bytes); trained ones keep theirs."""
    for module in (model.vision, model.lm):
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)


def quantize_frozen(model: "Flamingo", mode: Optional[str] = None) -> dict[str, int]:
    """Quantize the frozen backbones' linear weights in place to `mode` (default: `model.config.quantize_frozen`),
    on the device they are on, and record the mode in the config. Returns counts: layers quantized, layers left
    in their dtype (`kept`: a width the format cannot split; `skipped`: an `nn.Linear` subclass, `skipped_linears`,
    also warned about), and the backbones' weight bytes before and after (of the layers quantized or kept)."""
    configured = mode is None
    mode = model.config.quantize_frozen if configured else mode
    current = quantized_mode(model)
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize_frozen must be one of {', '.join(QUANTIZE_MODES)}; got {mode!r}")
    if current != "none":
        if current != mode:
            raise ValueError(f"the backbones are already quantized to {current}; quantizing is one-way: reload the "
                             f"model to use {mode}")
        if model.config.quantize_frozen == mode:  # (the mode is recorded once every layer is)
            return _counts()
        # else a quantization interrupted half way: the layers it left are quantized now
    if mode == "none":
        return _counts()
    trained = [name for name, on in (("freeze_lm", model.config.freeze_lm),
                                     ("freeze_vision", model.config.freeze_vision)) if not on]
    if trained:
        raise ValueError(f"quantize_frozen={mode} quantizes frozen backbones, but {' and '.join(trained)} is false: "
                         "a trained backbone keeps its weights in floating point (or set quantize_frozen: none)")
    if has_frozen_conv1d(model):
        warnings.warn(f"quantize_frozen={mode}: the LM's Conv1D layers are not quantized (only nn.Linear layers "
                      "are): they stay in floating point", stacklevel=2)
    skipped = skipped_linears(model)
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(f"quantize_frozen={mode}: {len(skipped)} frozen layer(s) subclass nn.Linear and are not "
                      f"quantized (their forward may not be a plain linear): {shown}; they stay in floating point",
                      stacklevel=2)
    linears = [entry for entry in _linears(model) if not isinstance(entry[2], QuantizedLinear)]
    if not linears:
        if current != "none":  # interrupted after its last layer, before recording the mode
            model.config.quantize_frozen = mode
        return _counts(skipped=len(skipped))
    try:
        check_available(mode, linears[0][2].weight.device)
    except QuantizationUnavailable as e:
        if not configured:
            raise
        raise QuantizationUnavailable(f"{e}. {mode} is the model config's mode (a saved model's, unless one is given "
                                      "at load): load with quantize_frozen='nf4', 'int8' or 'none' (on the command "
                                      "line --quantize-frozen nf4|int8|none)") from e
    before = sum(tensor_bytes(m.weight) for _, _, m in linears)
    quantized = kept = 0
    after = 0
    for parent, name, linear in linears:
        weight = _quantize_weight(linear.weight.detach(), mode)
        if weight is None:
            kept += 1
            after += tensor_bytes(linear.weight)
            continue
        setattr(parent, name, QuantizedLinear(linear, weight))  # a new module in the same place, not a new class
        quantized += 1
        after += tensor_bytes(weight)
    model.config.quantize_frozen = mode
    return _counts(quantized, kept, len(skipped), before, after)


def _counts(quantized: int = 0, kept: int = 0, skipped: int = 0, bytes_before: int = 0,
            bytes_after: int = 0) -> dict[str, int]:
    """`quantize_frozen`'s result (its docstring)."""
    return {"quantized": quantized, "kept": kept, "skipped": skipped, "bytes_before": bytes_before,
            "bytes_after": bytes_after}


def describe_counts(mode: str, counts: dict[str, int]) -> str:
    """One log line for `quantize_frozen`'s counts (the trainer and `from_pretrained` log it)."""
    return (f"quantize_frozen={mode}: {counts['quantized']} linear layers quantized, {counts['kept']} kept in float "
            f"(a width the format cannot split), {counts['skipped']} nn.Linear subclasses left alone, "
            f"{counts['bytes_before'] / 2**20:.1f} -> {counts['bytes_after'] / 2**20:.1f} MiB")


def _quantize_weight(weight: torch.Tensor, mode: str) -> Optional[torch.Tensor]:
    """One linear weight (out, in) as a torchao tensor, or None where the format cannot split its shape."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, to_nf4
    from torchao.quantization.quant_api import _int4_weight_only_quantize_tensor, _int8_weight_only_quantize_tensor

    if mode == "int8":
        return _int8_weight_only_quantize_tensor(weight, Int8WeightOnlyConfig())
    if mode == "int4":
        group = next((g for g in INT4_GROUP_SIZES if weight.shape[1] % g == 0), None)
        if group is None or weight.shape[0] % 8:  # tinygemm tiles 8 output rows
            return None
        config = Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                      set_inductor_config=False)
        return _int4_weight_only_quantize_tensor(weight.to(torch.bfloat16), config)  # tinygemm runs in bf16
    if weight.numel() % NF4_BLOCK_SIZE:
        return None
    blocks = weight.numel() // NF4_BLOCK_SIZE
    return to_nf4(weight, NF4_BLOCK_SIZE, math.gcd(blocks, NF4_SCALER_BLOCK))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a quantized tensor's packed data, scales and zero points; a plain tensor's elements."""
    if is_quantized(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def module_bytes(module: nn.Module, trained: Optional[bool] = None) -> int:
    """Bytes of `module`'s parameters and buffers (quantized ones as stored); `trained` selects parameters that
    train (True) or do not (False); buffers count as frozen. Shared tensors count once."""
    seen: set[int] = set()
    total = 0
    tensors = [(p, p.requires_grad) for p in module.parameters()] + [(b, False) for b in module.buffers()]
    for t, grad in tensors:
        if id(t) in seen or (trained is not None and grad != trained):
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total
