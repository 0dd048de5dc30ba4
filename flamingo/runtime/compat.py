"""Every place where the installed transformers (or torch) changes what the library must call, in one module.

The supported range is in pyproject.toml and docs/compat.md. Each branch here is tested on a version that takes it
(tests/test_compat.py; CI runs those tests on both ends of the range). Probes of the LM's forward signature are here
too: which arguments a forward takes moved between releases (`cache`, `logits_to_keep`) and differs by family.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Optional

import torch
import transformers
from torch import nn


def version_tuple(text: str) -> tuple[int, int]:
    """'4.56.2' / '2.6.0+cu124' / '5.0.0.dev0' -> (major, minor)."""
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# The floors of pyproject.toml's ranges (docs/compat.md says what fails below them).
TRANSFORMERS_FLOOR, TORCH_FLOOR = (4, 54), (2, 6)  # by minor (4.54.0 imports; pip installs 4.54.1 on)


def check_supported(transformers_version: str, torch_version: str) -> None:
    """A clear ImportError below the supported floors (an environment installed around pip's ranges), instead of a
    missing name deep in an import."""
    found = []
    if version_tuple(transformers_version) < TRANSFORMERS_FLOOR:
        found.append(f"transformers {transformers_version} (needs >= {'.'.join(map(str, TRANSFORMERS_FLOOR))})")
    if version_tuple(torch_version) < TORCH_FLOOR:
        found.append(f"torch {torch_version} (needs >= {'.'.join(map(str, TORCH_FLOOR))})")
    if found:
        raise ImportError(f"flamingo does not support {' and '.join(found)}: pip install -U 'transformers>=4.54.1,<6' "
                          f"'torch>=2.6' (docs/compat.md)")


TRANSFORMERS_VERSION: str = transformers.__version__
check_supported(TRANSFORMERS_VERSION, torch.__version__)
TRANSFORMERS: tuple[int, int] = version_tuple(TRANSFORMERS_VERSION)
TORCH: tuple[int, int] = version_tuple(torch.__version__)

from transformers.cache_utils import DynamicLayer  # noqa: E402  (4.54 on: after the floor check)

# The serving engine's batched decode cache (flamingo/model/batching.py) is a transformers cache layer; the layer
# interface it implements is the one of 5.4 on (4.54 - 5.3 changed it from release to release).
CONTINUOUS_BATCHING: bool = TRANSFORMERS >= (5, 4)

# The names an LM's forward and output give its KV cache: `cache` from transformers 5.24 on (where `past_key_values`
# is a deprecated alias that warns), `past_key_values` before.
CACHE_NAMES = ("cache", "past_key_values")


def _output_cache_field() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


# The field an LM output of our own (flamingo/model/mosaic_gpt.py) puts its cache in, by the same rule.
OUTPUT_CACHE_FIELD: str = _output_cache_field()

# transformers' generate asks the model for the mask of a static cache (`create_masks_for_generate`, passing `cache`),
# and static cache layers count their own positions: our MosaicGPT decodes with a static cache, compiled, from here.
STATIC_CACHE_MASK_HOOK: bool = TRANSFORMERS >= (5, 25)


def dtype_kwargs(dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """`from_pretrained`'s dtype keyword: `dtype` on transformers >= 4.56, `torch_dtype` before."""
    if dtype is None:
        return {}
    return {"dtype" if TRANSFORMERS >= (4, 56) else "torch_dtype": dtype}


def lm_output_cache(out: Any) -> Any:
    """The KV cache of an HF LM output (`cache` from 5.24 on, `past_key_values` before); None when it has none."""
    names = {f.name for f in dataclasses.fields(out)}
    return getattr(out, "cache" if "cache" in names else "past_key_values", None)


def _forward_parameters(lm: nn.Module) -> Any:
    return inspect.signature(lm.forward).parameters


def lm_cache_argument(lm: nn.Module) -> str:
    """The name of the LM forward's KV-cache argument: `cache` from 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in _forward_parameters(lm) else "past_key_values"


def lm_last_logits_only(lm: nn.Module) -> dict[str, int]:
    """Keyword arguments that make the LM compute the last position's logits only (`logits_to_keep=1`), where its
    forward takes them (transformers >= 4.50, most families); {} otherwise."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(lm) else {}


def lm_takes_position_ids(lm: nn.Module) -> bool:
    """Whether the LM's forward takes `position_ids` (MPT's, with ALiBi, does not)."""
    return "position_ids" in _forward_parameters(lm)


def keep_special_tokens_kwargs(tokenizer: Any) -> dict[str, bool]:
    """`add_special_tokens` keyword that keeps the tokenizer's existing extra special tokens when adding more:
    `replace_extra_special_tokens` in transformers 5, `replace_additional_special_tokens` in 4.x."""
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    flag = next((k for k in ("replace_extra_special_tokens", "replace_additional_special_tokens") if k in params), None)
    return {flag: False} if flag else {}


def pil_image_processor(name: str) -> type:
    """transformers' image processor class `name` on PIL/numpy: transformers 5's `...Pil` twin (the default class
    there may want torchvision, which we avoid), the class itself on 4.x."""
    cls = getattr(transformers, name + "Pil", None)
    return cls if cls is not None else getattr(transformers, name)


def checkpoint_leaves_pre_hooks_out(layer: nn.Module) -> bool:
    """Whether transformers checkpoints this decoder layer's `forward` only, so that the layer's forward pre-hooks
    run once, outside its checkpoint (`GradientCheckpointingLayer` of 5.x, which leaves module hooks such as FSDP2's
    out); releases whose layers override `__call__` checkpoint the hooks with the layer, and layers without the flag
    are checkpointed, if at all, by a call of the whole module."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and type(layer).__call__ is nn.Module.__call__


# The cache layer classes that hold attention K/V and nothing else per row (whole, or a sliding window's): what
# `select_cache_rows` can select rows of. Hybrid layers subclass them but also hold conv / recurrent states.
KV_CACHE_LAYERS: tuple[type, ...] = tuple(
    cls for cls in (DynamicLayer, getattr(transformers.cache_utils, "DynamicSlidingWindowLayer", None)) if cls)


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding row `rows[k]` of `cache` as its row k; `cache` itself stays untouched. Transformers' dynamic
    layers (4.54 on) rebind their tensors on update rather than write in place, so for them only the selected rows
    are copied; their subclasses (sliding windows) are copied whole first; legacy tuples (families that still return
    them) are indexed. Any other cache (linear-attention, state-space or recurrent states, or none) is refused with a
    ValueError naming it: transformers selects no rows of it, or not of all its states."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        odd = sorted({type(layer).__name__ for layer in layers if type(layer) not in KV_CACHE_LAYERS})
        if odd:
            raise ValueError(f"score / score_batch run each candidate on a copy of its context's cache, which needs "
                             f"attention K/V: this LM's cache has {odd} layers (linear attention, state-space or "
                             "recurrent states)")
        if all(type(layer) is DynamicLayer for layer in layers):
            clone = copy.copy(cache)
            clone.layers = [copy.copy(layer) for layer in layers]
        else:
            clone = copy.deepcopy(cache)
        clone.batch_select_indices(rows)
        return clone
    if isinstance(cache, (tuple, list)) and all(
            isinstance(layer, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in layer) for layer in cache):
        return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)
    raise ValueError(f"score / score_batch run each candidate on a copy of its context's cache, which needs "
                     f"attention K/V: this LM returned {type(cache).__name__} as its cache")


def idefics_rope_problem(lm_config: Any) -> Optional[str]:
    """Why IDEFICS cannot take a Llama config's rotary settings, or None: transformers 5's IDEFICS takes any
    `rope_parameters`; 4.x's has a fixed base of 10000 and no scaling."""
    if TRANSFORMERS >= (5, 0):
        return None
    theta, scaling = getattr(lm_config, "rope_theta", 10000.0), getattr(lm_config, "rope_scaling", None)
    if float(theta) != 10000.0 or scaling:
        return f"rotary base {theta} / scaling {scaling} (transformers 4's IDEFICS: base 10000, no scaling)"
    return None


def idefics_rope_kwargs(config: Any) -> dict[str, Any]:
    """The `LlamaConfig` keyword giving an IDEFICS config's rotary embedding: its `rope_parameters` on transformers
    5; none before, where IDEFICS's rotary base is fixed at 10000, LlamaConfig's default `rope_theta`."""
    params = getattr(config, "rope_parameters", None)
    return {} if params is None else {"rope_parameters": dict(params)}
