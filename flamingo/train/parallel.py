"""DDP and FSDP2 (`fully_shard`) for a Flamingo, applied from outside the model (the model knows nothing of
parallelism).

Units: each GATED XATTN-DENSE block, each LM decoder layer, the resampler, each vision encoder layer, then the root.
Frozen backbone weights can be

- **sharded** (`frozen="shard"`, default): every rank keeps 1/world of the frozen LM and tower and all-gathers each
  layer just in time. Wins when the frozen backbones do not fit (or barely fit) on one device next to the
  activations: a 9B-70B LM, or long sequences.
- **replicated** (`frozen="replicate"`): frozen weights are `ignored_params` of FSDP and stay whole on every rank
  (no gradients, so nothing to reduce for them); only the trained parameters (resampler, blocks, new token rows)
  are sharded. Wins when the backbones fit comfortably: no all-gather traffic for them in forward or backward, so
  the step is faster (the usual case for a 1-3B LM on 80 GB GPUs). Plain DDP (`train.distributed: ddp`) is the
  same trade with the trained parameters replicated too.

Quantized frozen backbones (`quantize_frozen`, torchao tensor subclasses) train under DDP and under FSDP2 with
`frozen="replicate"`: every rank loads the same backbone weights and quantizes them the same way, so they are left out
of DDP's start-up broadcast and of FSDP's sharding (torchao's int8/nf4 tensors implement neither the flat views of a
broadcast nor the splits of a shard).
"""

from __future__ import annotations

import copy
from typing import Callable, Literal, Optional

import torch
from torch import nn

from ..model.backbones import find_decoder_layers
from ..model.flamingo import Flamingo
from ..model.quantize import is_quantized
from ..model.xattn import MediaKV


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def _is_fsdp(module: nn.Module) -> bool:
    return hasattr(module, "unshard") and hasattr(module, "reshard")


def _layers(module: nn.Module) -> nn.Module:
    """The block list of an LM or a vision tower (the same generic finder the hooks use); empty if it has none."""
    try:
        return module.get_submodule(find_decoder_layers(module))
    except ValueError:
        return nn.ModuleList()


def _owned_kv(project_media: Callable[[torch.Tensor], MediaKV]) -> Callable[[torch.Tensor], MediaKV]:
    """`project_media` whose K and V are tensors of their own, not views.

    FSDP2 hooks the outputs of a forward method to all-gather the block's parameters again when their gradients
    arrive (the block's forward has resharded them by then, and `to_kv`'s backward still needs them), and warns at a
    view: an in-place op on one would drop that hook. A block's K and V are head-split chunks of one `to_kv` output;
    autograd already refuses in-place ops on those views (a multi-output view), so gradients were not at risk: this
    copy (B, N, R, 2·h·d per block, once per call; ~0.1 ms against ~700 ms for the block's forward and backward at
    B=2, T=512, D=2048, 5x64 visual tokens on CPU) keeps the log quiet and the hook safe without resting on that rule.
    Only under FSDP: the model's own path keeps the views."""

    def owned(visual: torch.Tensor) -> MediaKV:
        kv = project_media(visual)
        return MediaKV(*(t.clone() if t._base is not None else t for t in kv))

    return owned


def wrap_ddp(model: Flamingo, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP over the default process group; quantized frozen weights are not broadcast (each rank made its own).

    find_unused_parameters: a micro-batch without media (text-only chat rows) leaves the resampler and the blocks'
    attention out of its graph. When a step uses every parameter, DDP's C++ code says so in a notice that each rank
    prints; `runtime.launch.quiet_cpp_notices_off_rank_0` (called by the CLI before torch loads) keeps it to rank 0."""
    quantized = [name for name, p in model.named_parameters() if is_quantized(p)]
    if quantized:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, quantized)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=True)


def check_shardable(frozen: str, quantized: bool) -> None:
    """Refuse FSDP sharding of quantized frozen weights (torchao's tensors have no shard ops); the Trainer calls it
    before the model loads too, when the config names the mode."""
    if frozen == "shard" and quantized:
        raise ValueError("FSDP cannot shard quantized frozen weights (torchao's tensors have no shard ops): set "
                         "train.fsdp_frozen: replicate (each rank keeps the whole quantized backbones, the point "
                         "of quantizing them) or train.distributed: ddp")


def apply_fsdp(model: Flamingo, *, frozen: Literal["shard", "replicate"] = "shard",
               param_dtype: Optional[torch.dtype] = None, mesh: Optional[object] = None) -> Flamingo:
    """Shard `model` in place with FSDP2 over the default process group (or `mesh`).

    param_dtype: compute dtype of the all-gathered parameters (e.g. bf16; gradients are reduced in fp32, the
    sharded master copies keep their own dtype).
    """
    if frozen not in ("shard", "replicate"):
        raise ValueError(f"frozen must be 'shard' or 'replicate', got {frozen!r}")
    check_shardable(frozen, any(is_quantized(p) for p in model.parameters()))
    fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method = _fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    ignored = {p for p in model.parameters() if not p.requires_grad} if frozen == "replicate" else None
    kwargs = dict(mesh=mesh, mp_policy=policy)

    def shard(module: nn.Module) -> None:
        params = list(module.parameters())
        if not params:
            return
        if ignored is not None and all(p in ignored for p in params):
            return  # wholly frozen and replicated: nothing for FSDP to do
        fully_shard(module, ignored_params=ignored, **kwargs)

    for block in model.xattn:
        shard(block)
        if hasattr(block, "project_media") and _is_fsdp(block):
            # the model calls block.project_media(visual) (K/V once per call) outside block.forward: FSDP must
            # all-gather the block's parameters around that call too
            block.project_media = _owned_kv(block.project_media)
            register_fsdp_forward_method(block, "project_media")
    shard(model.resampler)
    for layer in [*_layers(model.lm), *_layers(model.vision)]:
        shard(layer)
    fully_shard(model, ignored_params=ignored, **kwargs)
    return model


def unsharded_copy(model: Flamingo, *, share_frozen: bool) -> Flamingo:
    """A copy of `model` taken before FSDP shards it, for saving the model as it trained (its frozen weights' dtype,
    adapters, quantization; a given model's own backbones) on one rank: its parameters are meta tensors (no memory),
    filled by `fill_unsharded`; buffers, and with `share_frozen` (`frozen="replicate"`: FSDP leaves them whole) the
    frozen parameters, are the model's own tensors, shared. Tied parameters stay tied."""
    memo: dict[int, object] = {id(b): b for b in model.buffers()}
    for p in model.parameters():
        memo[id(p)] = p if share_frozen and not p.requires_grad else nn.Parameter(
            torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def fill_unsharded(model: Flamingo, values: dict[str, torch.Tensor]) -> Flamingo:
    """A copy of `unsharded_copy`'s `model` whose meta parameters hold `values` (by state-dict name, full tensors; a
    tied alias missing from `values` takes its parameter's), its other tensors shared; `model` stays as it is, for a
    later save."""
    memo: dict[int, object] = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    slots = [(f"{prefix}.{name}" if prefix else name, p) for prefix, module in model.named_modules(
        remove_duplicate=False) for name, p in module._parameters.items() if p is not None and p.is_meta]
    for key, p in slots:
        if key in values and id(p) not in memo:
            memo[id(p)] = nn.Parameter(values[key].to(p.dtype), requires_grad=p.requires_grad)
    missing = [key for key, p in slots if id(p) not in memo]
    if missing:
        raise ValueError(f"no gathered values for the model's parameters {missing[:3]}")
    return copy.deepcopy(model, memo)
