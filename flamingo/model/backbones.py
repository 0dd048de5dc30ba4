"""Loading and probing the frozen backbones: any HF vision tower giving patch features, any HF causal LM."""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..runtime.compat import dtype_kwargs
from ..runtime.hub import local_or_hub
from .mosaic_gpt import register as register_mosaic_gpt

# Architectures whose decoder layer list the generic search could miss or mistake (model_type -> dotted path).
DECODER_LAYERS_OVERRIDES: dict[str, str] = {}


def find_decoder_layers(lm: nn.Module) -> str:
    """Dotted path of the LM's decoder layer list: the largest `nn.ModuleList` of blocks of one class, preferring
    one whose length equals `config.num_hidden_layers`."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in DECODER_LAYERS_OVERRIDES:
        return DECODER_LAYERS_OVERRIDES[model_type]
    expected = None
    if hasattr(lm, "config"):
        text_config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        expected = getattr(text_config, "num_hidden_layers", None)
    best: Optional[tuple[tuple[bool, int], str]] = None
    for name, module in lm.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        score = (len(module) == expected, len(module))
        if best is None or score > best[0]:
            best = (score, name)
    if best is None:
        raise ValueError(f"could not find the decoder layers of {type(lm).__name__}; add its model_type to "
                         "flamingo.model.backbones.DECODER_LAYERS_OVERRIDES")
    return best[1]


def hidden_size_of(config: Any) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "embed_dim"):
        if hasattr(config, key):
            return int(getattr(config, key))
    raise ValueError(f"cannot tell the hidden size of {type(config).__name__}")


def with_dtype(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`from_pretrained` kwargs with an explicit dtype: float32 unless they name one. transformers 5 would otherwise
    load in the dtype the backbone's config names (most Hub LMs say bf16 or fp16) and transformers 4 in float32;
    our resampler and blocks are built in float32, and one model runs in one dtype."""
    given = {k: v for k, v in kwargs.items() if not (k in ("dtype", "torch_dtype") and v is None)}
    if "dtype" in given or "torch_dtype" in given:
        return given
    return {**given, **dtype_kwargs(torch.float32)}


def load_vision_tower(vision: Union[str, os.PathLike, nn.Module], **kwargs: Any) -> nn.Module:
    """An HF vision tower from a model or a name/path (a local directory, else a Hub name; kwargs: `from_pretrained`'s,
    its dtype float32 unless given). Dual encoders (CLIPModel, SiglipModel) give their vision half, loaded as the
    standalone vision model class of their `vision_config`."""
    if isinstance(vision, nn.Module):
        model = vision
    else:
        local_or_hub(vision, "vision tower")
        model = AutoModel.from_pretrained(vision, **with_dtype(kwargs))
    config = getattr(model, "config", None)
    if hasattr(model, "vision_model") and hasattr(config, "vision_config") and hasattr(model, "text_model"):
        half = model.vision_model
        if isinstance(half, PreTrainedModel):  # transformers 5: the half is already a standalone vision model
            half.name_or_path = getattr(model, "name_or_path", "")
            return half
        tower = AutoModel.from_config(config.vision_config)  # transformers 4: wrap the inner transformer
        if not hasattr(tower, "vision_model"):
            raise ValueError(f"cannot take the vision half of {type(model).__name__}")
        tower.vision_model = half
        tower.name_or_path = getattr(model, "name_or_path", "")
        return tower.to(next(model.parameters()).dtype)
    check_vision_tower(model, vision)
    return model


def check_vision_tower(model: nn.Module, source: Any) -> None:
    """ValueError unless `model` reads images: its forward takes `pixel_values` (or any keyword) and no `input_ids`.
    An LM directory given as the tower loads as e.g. a `LlamaModel`, and would fail much later, far from the cause
    (at the image processor it has none of, or in the first forward)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward Python cannot inspect: let its first call tell
        return
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "input_ids" in params or not ("pixel_values" in params or any_keyword):
        config = getattr(model, "config", None)
        what = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
        where = "" if isinstance(source, nn.Module) else f" loaded from {os.fspath(source)!r}"
        raise ValueError(f"the vision tower{where} is a {what}, not a vision tower: its forward reads "
                         f"{'input_ids' if 'input_ids' in params else 'no pixel_values'}. Give a vision model "
                         "(e.g. CLIPVisionModel, SiglipVisionModel) or a dual encoder (CLIPModel, SiglipModel)")


def load_lm(lm: Union[str, os.PathLike, nn.Module], **kwargs: Any) -> PreTrainedModel:
    """An HF causal LM from a model or a name/path (a local directory, else a Hub name; kwargs: `from_pretrained`'s,
    its dtype float32 unless given); the LM classes transformers lacks (MosaicGPT) included."""
    if isinstance(lm, nn.Module):
        return lm
    local_or_hub(lm, "LM")
    register_mosaic_gpt()
    check_causal_lm_source(lm, **kwargs)
    return AutoModelForCausalLM.from_pretrained(lm, **with_dtype(kwargs))


# `from_pretrained` kwargs that say where a config is read from (the others are the model's)
_CONFIG_SOURCE_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "subfolder", "local_files_only")


def check_causal_lm_source(lm: Union[str, os.PathLike], **kwargs: Any) -> None:
    """ValueError unless the config at `lm` (a name/path; kwargs: `from_pretrained`'s) is one AutoModelForCausalLM
    has a class for (`check_causal_lm`). A config that cannot be read is left to `from_pretrained`, which says why."""
    try:
        config = AutoConfig.from_pretrained(lm, **{k: v for k, v in kwargs.items() if k in _CONFIG_SOURCE_KWARGS})
    except Exception:  # unreadable, unknown model_type, remote code not trusted: from_pretrained's error tells
        return
    check_causal_lm(config, lm)


def check_causal_lm(config: PretrainedConfig, source: Union[str, os.PathLike]) -> None:
    """ValueError unless AutoModelForCausalLM has a class for `config` (transformers', a registered one such as our
    MosaicGPT, or remote code its `auto_map` names). A vision tower or an encoder given as the LM would otherwise fail
    in transformers with the list of every causal LM class it has."""
    remote = getattr(config, "auto_map", None) or {}
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or "AutoModelForCausalLM" in remote:
        return
    raise ValueError(f"the LM {os.fspath(source)!r} is a {getattr(config, 'model_type', None)!r} model "
                     f"({type(config).__name__}), not a causal LM: AutoModelForCausalLM has no class for it (is it the "
                     "vision tower?). Give a causal LM, e.g. LlamaForCausalLM or MptForCausalLM")


def name_or_path_of(model: Union[str, os.PathLike, nn.Module]) -> Optional[str]:
    """What `from_pretrained` needs to load this backbone again, or None for an in-memory model without one. A path
    that exists is made absolute: stored relative, it would later be read from another working directory, or as a
    Hub name (`org/name`)."""
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
    else:
        name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not name:
        return None
    return os.path.abspath(name) if os.path.exists(name) else str(name)


def num_cls_tokens(vision: nn.Module, seq_len: int) -> int:
    """1 when the tower's output has a CLS token in front of its patch grid (CLIP, ViT), 0 otherwise (SigLIP)."""
    config = getattr(vision, "config", None)
    image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    if isinstance(patch_size, (list, tuple)):
        patch_size = patch_size[0]
    if image_size and patch_size:
        return 1 if seq_len == (image_size // patch_size) ** 2 + 1 else 0
    return 0


def vision_features(vision: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -1,
                    drop_cls: bool = True) -> torch.Tensor:
    """pixel_values (M, C, H, W) -> patch features (M, S, Dv) from the tower's output or one of its hidden states."""
    if feature_layer == -1:
        hidden = vision(pixel_values=pixel_values).last_hidden_state
    else:
        hidden = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[feature_layer]
    if drop_cls:
        hidden = hidden[:, num_cls_tokens(vision, hidden.shape[1]):]
    return hidden  # (M, S, Dv)


def vision_hidden_size(vision: nn.Module) -> int:
    return hidden_size_of(vision.config)


def lm_text_config(lm: PreTrainedModel) -> Any:
    return lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config


# The position limit of configs that name it otherwise and do not map `max_position_embeddings` to it (GPT-2's
# `n_positions` and DBRX's `max_seq_len` are mapped): transformers' MPT builds its ALiBi bias for `max_seq_len`
# positions and cannot add it to a longer call's scores. (Our MosaicGPT, also `max_seq_len`, extrapolates ALiBi.)
POSITION_LIMIT_FIELDS = {"mpt": "max_seq_len"}


def lm_max_positions(lm: PreTrainedModel) -> Optional[int]:
    """The positions the LM was built for (`max_position_embeddings`, or its family's own name for it:
    `POSITION_LIMIT_FIELDS`), None when its config names none. Past them an LM with learned positions (GPT-2, OPT) or
    a fixed ALiBi table (MPT) fails deep inside torch, and a rotary one runs outside what it was trained on."""
    return config_max_positions(lm.config)


def config_max_positions(config: PretrainedConfig) -> Optional[int]:
    """`lm_max_positions` of the LM `config` builds, from the config alone."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    if value is None and getattr(text, "model_type", None) in POSITION_LIMIT_FIELDS:
        value = getattr(text, POSITION_LIMIT_FIELDS[text.model_type], None)
    return value if isinstance(value, int) and value > 0 else None
