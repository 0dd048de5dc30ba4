"""LoRA on the frozen LM (`FlamingoConfig.lm_lora`): a middle road between a frozen and a fully trained LM.

PEFT's `inject_adapter_in_model` puts its adapters into the LM in place: each targeted `nn.Linear` inside the decoder
layers becomes a `lora.Linear` holding the original layer (`base_layer`) and the adapter (`lora_A`, `lora_B`). The
LM keeps its class, its decoder layers (where our pre-hooks sit) and its input embedding and output head (where the
added-token hooks sit); no `PeftModel` wrapper. `lora_B` starts at zero, so a fresh adapter changes nothing: with the
gates at 0 the model is still the bare LM at init. Only the adapters train; the LM's weights stay untouched.

Persistence: the adapters are `Flamingo` parameters named `lm.<module>.lora_A.default.weight` etc.; they are written
in `flamingo.safetensors` in both checkpoint modes, while a full checkpoint's `lm/` directory holds the bare LM
(`base_state_dict`). Loading builds the LM, injects fresh adapters from the config, then loads their weights.
`merge_lora` folds them into the LM's weights for inference (one matmul per layer again) and restores the plain
modules.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import lora_spec
from .quantize import QuantizedLinear

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
ADAPTER_MARK = ".lora_"  # in the state-dict keys of the adapters' tensors (lora_A, lora_B, lora_embedding_A, ...)


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError("lm_lora needs peft: pip install 'flamingo-vlm[memory]'") from e
    return peft


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's name is the target or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def unmatched_targets(lm: nn.Module, spec: dict[str, Any]) -> list[str]:
    """The names in `spec["target_modules"]` that match no module of `lm` (a typo trains without those adapters)."""
    names = [n for n, _ in lm.named_modules()]
    return [t for t in lora_spec(spec)["target_modules"] if not any(_matches(n, t) for n in names)]


def check_targets(lm: nn.Module, spec: dict[str, Any]) -> None:
    """Refuse, for adapters about to be trained, a target name that matches nothing while others match (none
    matching is `apply_lora`'s error). A saved model is loaded with the adapters its names matched: only warned."""
    unmatched = unmatched_targets(lm, spec)
    if unmatched and len(unmatched) < len(lora_spec(spec)["target_modules"]):
        raise ValueError(f"lm_lora.target_modules {unmatched} match no module of {type(lm).__name__}: check the "
                         "spelling (a name left out would train without its adapters)")


def apply_lora(lm: nn.Module, spec: dict[str, Any], new: bool = True) -> nn.Module:
    """Inject LoRA adapters into `lm` in place (its other weights are frozen; only the adapters require grad);
    returns `lm`. `Flamingo` calls this from `config.lm_lora`; it also serves a bare LM (a peer's, in a bench).
    new: adapters about to be trained, so a target name matching nothing is refused (`check_targets`); False for a
    saved model's (warned: its adapters are those its names matched when it was made)."""
    spec = lora_spec(spec)
    peft = _peft()
    if has_lora(lm):
        raise ValueError("the LM already holds LoRA adapters")
    tables = {id(m) for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None} \
        if hasattr(lm, "get_input_embeddings") else set()
    names = [n for n, m in lm.named_modules() if any(_matches(n, t) for t in spec["target_modules"])]
    if names and new:
        check_targets(lm, spec)
    elif names and (unmatched := unmatched_targets(lm, spec)):
        log.warning("lm_lora.target_modules %s match no module of %s (adapters on the others)", unmatched,
                    type(lm).__name__)
    _check_not_quantized(lm, names)
    hooked = [n for n, m in lm.named_modules() if id(m) in tables and n in names]
    if hooked:
        raise ValueError(f"lm_lora.target_modules reach the LM's token tables {hooked}: Flamingo's added-token rows "
                         "hook them; target the decoder layers' projections (e.g. q_proj, v_proj)")
    linear = [n for n in names if _is_linear(lm.get_submodule(n))]
    if not linear:
        raise ValueError(f"lm_lora.target_modules {spec['target_modules']} name no linear layer of "
                         f"{type(lm).__name__} (e.g. Llama: q_proj, k_proj, v_proj, o_proj; GPT-2: c_attn)")
    other = sorted({type(lm.get_submodule(n)).__name__ for n in names if not _is_linear(lm.get_submodule(n))})
    if other:
        raise ValueError(f"lm_lora.target_modules {spec['target_modules']} also name non-linear modules ({other}): "
                         "name the linear projections themselves")
    conv1d = all(type(lm.get_submodule(n)).__name__ == "Conv1D" for n in linear)  # (in, out) weights: GPT-2
    config = peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["target_modules"],
                             lora_dropout=spec["dropout"], bias="none", init_lora_weights=True, fan_in_fan_out=conv1d)
    peft.inject_adapter_in_model(config, lm, adapter_name=ADAPTER_NAME)
    _float32_adapters(lm)
    return lm


def _float32_adapters(lm: nn.Module) -> None:
    """Adapters in float32 where PEFT made them in their base layer's half dtype (an LM cast to bf16 before
    `apply_lora`): trained parameters keep float32 weights and AdamW states, as the trainer's (PEFT's
    `autocast_adapter_dtype` rule); PEFT casts the input to the adapter's dtype and the result back."""
    for name, p in lm.named_parameters():
        if ADAPTER_MARK in f".{name}" and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def _is_linear(module: nn.Module) -> bool:
    """A layer PEFT's LoRA adapts: `nn.Linear` and its subclasses (Falcon's `FalconLinear`), GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _check_not_quantized(lm: nn.Module, names: list[str]) -> None:
    """Refuse targets that `quantize_frozen` already packed: adapters are added to the float layers, and the base
    weights quantized after (the trainer and `from_pretrained` do it in that order)."""
    packed = [n for n in names if isinstance(lm.get_submodule(n), QuantizedLinear)]
    if packed:
        raise ValueError(f"the LM is already quantized ({packed[0]} is a QuantizedLinear): add LoRA adapters before "
                         "quantizing (load with quantize_frozen='none' and quantize after apply_lora, or set lm_lora "
                         "in the config)")


def _tuner_layers(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in lm.named_modules() if isinstance(m, BaseTunerLayer)]


def train_adapters(lm: nn.Module, mode: bool) -> None:
    """Put the adapters' dropout in `mode`: a frozen LM stays in eval mode, but its adapters train."""
    for name, module in lm.named_modules():
        if name.rpartition(".")[2] == "lora_dropout":
            module.train(mode)


# the spec's keys that set what the adapters compute (their layers, their scale alpha / r); dropout acts in training
FUNCTION_KEYS = ("r", "alpha", "target_modules")


def same_adapters(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two `lm_lora` specs make the same adapters: r, alpha and target_modules (their order is no change);
    the dropout may differ."""
    a, b = lora_spec(a), lora_spec(b)
    return all((sorted(a[k]) == sorted(b[k])) if k == "target_modules" else a[k] == b[k] for k in FUNCTION_KEYS)


def describe(spec: dict[str, Any]) -> str:
    """An `lm_lora` spec in words, for messages: `r=4, alpha=8 on q_proj, v_proj` (and its dropout when set)."""
    spec = lora_spec(spec)
    dropout = f", dropout {spec['dropout']:g}" if spec["dropout"] else ""
    return f"r={spec['r']}, alpha={spec['alpha']:g} on {', '.join(spec['target_modules'])}{dropout}"


def set_dropout(lm: nn.Module, p: float) -> None:
    """Give every adapter of `lm` the dropout probability `p`, as PEFT builds it (an `nn.Dropout`, or an identity at
    0): it acts in training only, so the adapters compute what they did."""
    for _, layer in _tuner_layers(lm):
        layer.lora_dropout[ADAPTER_NAME] = nn.Dropout(p=p) if p > 0 else nn.Identity()


def has_lora(lm: nn.Module) -> bool:
    return any(ADAPTER_MARK in n for n, _ in lm.named_parameters())


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key names an adapter tensor."""
    return ADAPTER_MARK in key


def base_state_dict(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The LM's state dict without its adapters, under the bare LM's keys (`...q_proj.base_layer.weight` ->
    `...q_proj.weight`): what `lm.save_pretrained` must write so that the directory loads as the plain HF model."""
    return {k.replace(".base_layer.", "."): v for k, v in lm.state_dict().items() if not is_adapter_key(k)}


def merge_lora(lm: nn.Module, merged: Optional[Callable[[str], None]] = None) -> list[str]:
    """Fold each adapter into its layer's weight (W + alpha/r * B A) and put the plain layer back in place of PEFT's;
    returns the names (in `lm`) of the weights that changed. After this the LM is a plain HF model again. `merged` is
    told each weight as it changes, so that a merge interrupted half way (then run again, which merges the rest)
    leaves no changed weight unrecorded."""
    if not has_lora(lm):
        raise ValueError("the LM holds no LoRA adapters to merge")
    changed = []
    for name, layer in _tuner_layers(lm):
        layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])  # (a layer merged already is not merged again)
        if merged is not None:
            merged(f"{name}.weight")
        parent, _, child = name.rpartition(".")
        base = layer.get_base_layer()
        setattr(lm.get_submodule(parent) if parent else lm, child, base)
        changed.append(f"{name}.weight")
    if hasattr(lm, "peft_config"):
        del lm.peft_config
    return changed
