"""Loading and probing the frozen backbones: any HF vision tower giving patch features, any HF causal LM."""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Optional, Union

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..runtime.compat import dtype_kwargs
from ..runtime.hub import local_or_hub
from .mosaic_gpt import register as register_mosaic_gpt

try:  # huggingface_hub >= 0.32: transformers 5's configs check their fields' types as they load
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older one (transformers 4): no typed configs

    class StrictDataclassError(Exception):  # type: ignore[no-redef]
        """Stands in for huggingface_hub's: nothing raises it."""

# Architectures whose decoder layer list the generic search could miss or mistake (model_type -> dotted path).
DECODER_LAYERS_OVERRIDES: dict[str, str] = {}
# Architectures with no decoder layer modules a block could go before (model_type -> why).
_ALTUP = ("its decoder layers take several stacked residual streams (AltUp: (streams, B, T, D)), not the one (B, T, D) "
          "stream a block reads")
DECODER_LAYERS_REFUSED: dict[str, str] = {
    "xlm": "it keeps parallel per-layer lists (attentions, ffns, layer norms), no decoder layer module, so a block "
           "before one would feed only an attention's input, not the residual stream",
    "gemma3n_text": _ALTUP,
    "gemma3n": _ALTUP,
}
# Config fields giving the length of an LM's decoder layer list, tried in this order: BART-style decoders count
# theirs in `decoder_layers`, and LongCat-Flash's `num_hidden_layers` counts sublayers (its list has `num_layers`).
LAYER_COUNT_KEYS = ("num_hidden_layers", "decoder_layers", "num_decoder_layers", "num_layers")


def find_decoder_layers(lm: nn.Module) -> str:
    """Dotted path of the LM's decoder layer list: the outermost `nn.ModuleList` whose length is the config's layer
    count (`LAYER_COUNT_KEYS`), one of a single block class first; its layers may differ in class (hybrid LMs mix
    attention and state-space layers). A list inside another list's modules (a layer's experts, a shared MLP's
    adapters) is never taken, and when no list has the config's length the LM is refused rather than hooked onto a
    smaller list. An LM without a config gets its largest list of one block class."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in DECODER_LAYERS_OVERRIDES:
        path = DECODER_LAYERS_OVERRIDES[model_type]
        try:
            found = lm.get_submodule(path)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList) or not len(found):
            raise ValueError(f"DECODER_LAYERS_OVERRIDES[{model_type!r}] = {path!r} names "
                             f"{'nothing' if found is None else type(found).__name__} in {type(lm).__name__}, not a "
                             "non-empty nn.ModuleList of its decoder layers")
        return path
    if model_type in DECODER_LAYERS_REFUSED:
        raise ValueError(f"{type(lm).__name__} cannot take cross-attention blocks: "
                         f"{DECODER_LAYERS_REFUSED[model_type]}")
    lists: dict[str, nn.ModuleList] = {}  # the outermost non-empty ModuleLists, in module order
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and not any(name.startswith(f"{outer}.")
                                                                          for outer in lists):
            lists[name] = module
    uniform = [name for name, module in lists.items() if len({type(m) for m in module}) == 1]
    counts: dict[str, int] = {}
    if hasattr(lm, "config"):
        text_config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        for key in LAYER_COUNT_KEYS:
            value = getattr(text_config, key, None)
            if isinstance(value, int) and value > 0 and value not in counts.values():
                counts[key] = value
    if not counts:
        if not uniform:
            raise ValueError(f"could not find the decoder layers of {type(lm).__name__}; add its model_type to "
                             "flamingo.model.backbones.DECODER_LAYERS_OVERRIDES")
        return max(uniform, key=lambda name: len(lists[name]))  # the first of the largest
    for count in counts.values():
        matching = [name for name in lists if len(lists[name]) == count]
        if matching:
            return next((name for name in matching if name in uniform), matching[0])
    found = {name: len(module) for name, module in lists.items()}
    raise ValueError(f"could not find the decoder layers of {type(lm).__name__}: no nn.ModuleList has the "
                     f"config's layer count ({counts}); lists found: {found}. Add its model_type to "
                     "flamingo.model.backbones.DECODER_LAYERS_OVERRIDES")


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


def recorded_dtype(directory: Union[str, os.PathLike]) -> Optional[torch.dtype]:
    """The floating dtype a saved backbone directory's config.json records (`dtype`; `torch_dtype` from transformers
    4), which `save_pretrained` writes from the weights it saves; None when there is no such file or dtype."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def load_vision_tower(vision: Union[str, os.PathLike, nn.Module], **kwargs: Any) -> nn.Module:
    """An HF vision tower from a model or a name/path (a local directory, else a Hub name; kwargs: `from_pretrained`'s,
    its dtype float32 unless given). Dual encoders (CLIPModel, SiglipModel) give their vision half, loaded as the
    standalone vision model class of their `vision_config`."""
    if isinstance(vision, nn.Module):
        check_loadable_class(vision, "vision tower")
        model = vision
    else:
        local_or_hub(vision, "vision tower")
        check_no_remote_code(vision, "vision tower", **kwargs)
        model = _vision_from_pretrained(vision, **without_remote_code(with_dtype(kwargs)))
    config = getattr(model, "config", None)
    if hasattr(model, "vision_model") and hasattr(config, "vision_config") and hasattr(model, "text_model"):
        half = model.vision_model
        check_vision_tower(half, vision)  # a NaFlex dual encoder's (SigLIP2's) half needs more than pixels
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
    """ValueError unless `model` reads images as Flamingo feeds them: its forward takes `pixel_values` (or any
    keyword), no `input_ids`, and needs no other input; and it encodes every patch the same way at every call. An LM
    directory given as the tower loads as e.g. a `LlamaModel`, and would fail much later, far from the cause (at the
    image processor it has none of, or in the first forward); a NaFlex tower (SigLIP2's) needs its patches' masks and
    shapes; ViTMAE drops and shuffles its patches at random, so its features change from call to call."""
    config = getattr(model, "config", None)
    what = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    where = "" if isinstance(source, nn.Module) else f" loaded from {os.fspath(source)!r}"
    if getattr(config, "model_type", None) == "vit_mae":
        raise ValueError(f"the vision tower{where} is a {what}, which drops (mask_ratio="
                         f"{getattr(config, 'mask_ratio', None)}) and shuffles its patches at random in every "
                         "forward: its features would change from call to call. Give a tower that encodes every "
                         "patch (e.g. ViTModel, CLIPVisionModel)")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward Python cannot inspect: let its first call tell
        return
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "input_ids" in params or not ("pixel_values" in params or any_keyword):
        raise ValueError(f"the vision tower{where} is a {what}, not a vision tower: its forward reads "
                         f"{'input_ids' if 'input_ids' in params else 'no pixel_values'}. Give a vision model "
                         "(e.g. CLIPVisionModel, SiglipVisionModel) or a dual encoder (CLIPModel, SiglipModel)")
    needed = [name for name, p in params.items() if name != "pixel_values" and p.default is p.empty
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if needed:
        raise ValueError(f"the vision tower{where} is a {what}, whose forward needs {needed} besides pixel_values: "
                         "Flamingo feeds a tower pixel values (B, C, H, W) only (NaFlex towers, such as SigLIP2's, "
                         "are not supported). Give a fixed-resolution tower (e.g. SiglipVisionModel, "
                         "CLIPVisionModel)")


def load_lm(lm: Union[str, os.PathLike, nn.Module], **kwargs: Any) -> PreTrainedModel:
    """An HF causal LM from a model or a name/path (a local directory, else a Hub name; kwargs: `from_pretrained`'s,
    its dtype float32 unless given); the LM classes transformers lacks (MosaicGPT) included."""
    if isinstance(lm, nn.Module):
        check_loadable_class(lm, "LM")
        return lm
    local_or_hub(lm, "LM")
    register_mosaic_gpt()
    check_causal_lm_source(lm, **kwargs)
    return backbone_from_pretrained(AutoModelForCausalLM, lm, "LM", **without_remote_code(with_dtype(kwargs)))


def backbone_from_pretrained(auto: Any, source: Union[str, os.PathLike], what: str, **kwargs: Any) -> Any:
    """`auto.from_pretrained(source, **kwargs)`; a config field of the wrong type (a hand-edited `"hidden_size":
    "64"`, which transformers 5's typed configs refuse) is a one-line ValueError naming the backbone and its file."""
    try:
        return auto.from_pretrained(source, **kwargs)
    except StrictDataclassError as e:
        local = os.path.join(os.fspath(source), "config.json")
        where = repr(local) if os.path.isfile(local) else f"{os.fspath(source)!r}'s config.json"
        raise ValueError(f"the {what}'s config {where} is invalid: {' '.join(str(e).split())}") from e


def _vision_from_pretrained(source: Union[str, os.PathLike], **kwargs: Any) -> Any:
    """`AutoModel`'s model for the tower at `source`; a standalone vision model AutoModel has no entry for (BLIP's,
    OWL-ViT's, AltCLIP's: the half a model saved whole on their dual encoder stores) by the transformers class its
    config names (`architectures`)."""
    try:
        return backbone_from_pretrained(AutoModel, source, "vision tower", **kwargs)
    except ValueError:  # "Unrecognized configuration class" (transformers 5), "does not recognize" (4.x)
        raw, _ = PretrainedConfig.get_config_dict(
            source, **{k: v for k, v in kwargs.items() if k in _CONFIG_SOURCE_KWARGS})
        named = [getattr(transformers, arch, None) for arch in raw.get("architectures") or []]
        classes = [cls for cls in named if isinstance(cls, type) and issubclass(cls, PreTrainedModel)]
        if not classes:
            raise
        return backbone_from_pretrained(classes[0], source, "vision tower", **kwargs)


# `from_pretrained` kwargs that say where a config is read from (the others are the model's)
_CONFIG_SOURCE_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only")


def without_remote_code(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`from_pretrained` kwargs with `trust_remote_code=False`: a repository's own Python is never run (nor asked
    about: left unset, transformers prompts on a terminal). Refuses kwargs that ask for it."""
    if kwargs.get("trust_remote_code"):
        raise ValueError("trust_remote_code: flamingo never runs a repository's own Python; give a backbone "
                         "transformers has a class for")
    return {**kwargs, "trust_remote_code": False}


def check_no_remote_code(source: Union[str, os.PathLike], what: str, **kwargs: Any) -> None:
    """ValueError when the config at `source` (a name/path; kwargs: `from_pretrained`'s) needs remote code: its
    `auto_map` names the repository's own classes and transformers has none for its `model_type` (nor one registered
    here, such as MosaicGPT). Such a backbone could not load without running downloaded Python, and a model built on
    an in-memory one could never be loaded back. A config that cannot be read is left to `from_pretrained`."""
    try:
        raw, _ = PretrainedConfig.get_config_dict(
            os.fspath(source), **{k: v for k, v in kwargs.items() if k in _CONFIG_SOURCE_KWARGS})
    except Exception:  # unreadable or absent: from_pretrained's error tells
        return
    auto_map, model_type = raw.get("auto_map") or {}, raw.get("model_type")
    if auto_map and model_type not in CONFIG_MAPPING:
        raise ValueError(_remote_code_message(source, what, model_type, auto_map))


def check_loadable_class(model: nn.Module, what: str) -> None:
    """ValueError when an in-memory backbone is remote code (`check_no_remote_code`: loaded with
    `trust_remote_code=True`): a model built on it would save, full or trained-only, and never load back."""
    config = getattr(model, "config", None)
    auto_map, model_type = getattr(config, "auto_map", None), getattr(config, "model_type", None)
    if auto_map and model_type not in CONFIG_MAPPING:
        source = getattr(model, "name_or_path", "") or f"in-memory {type(model).__name__}"
        raise ValueError(_remote_code_message(source, what, model_type, auto_map))


def _remote_code_message(source: Union[str, os.PathLike], what: str, model_type: Any, auto_map: Any) -> str:
    return (f"the {what} {os.fspath(source)!r} needs remote code: transformers has no class to load it with "
            f"(model_type {model_type!r}), and its config's auto_map ({', '.join(sorted(map(str, auto_map)))}) "
            "names the repository's own Python, which flamingo never runs (no trust_remote_code). Give a checkpoint "
            "of a model transformers ships (a converted copy of it)")


def check_causal_lm_source(lm: Union[str, os.PathLike], **kwargs: Any) -> None:
    """ValueError unless the config at `lm` (a name/path; kwargs: `from_pretrained`'s) is one AutoModelForCausalLM
    has a class for without remote code (`check_no_remote_code`, `check_causal_lm`). A config that cannot be read is
    left to `from_pretrained`, which says why."""
    check_no_remote_code(lm, "LM", **kwargs)
    try:
        config = AutoConfig.from_pretrained(lm, trust_remote_code=False,
                                            **{k: v for k, v in kwargs.items() if k in _CONFIG_SOURCE_KWARGS})
    except Exception:  # unreadable, unknown model_type: from_pretrained's error tells
        return
    check_causal_lm(config, lm)


def check_causal_lm(config: PretrainedConfig, source: Union[str, os.PathLike]) -> None:
    """ValueError unless AutoModelForCausalLM has a class for `config` (transformers', or a registered one such as
    our MosaicGPT). A vision tower or an encoder given as the LM would otherwise fail in transformers with the list of
    every causal LM class it has; an LM whose causal-LM class is remote code (its `auto_map`) is never run."""
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    remote = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in remote:
        raise ValueError(_remote_code_message(source, "LM", getattr(config, "model_type", None), remote))
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


# At most this many tokens before a tower's patch grid are taken for its CLS, register and distillation tokens
# (DINOv2 with registers: 1 + 4); an output that differs from the grid by more, or has fewer tokens, is not one token
# per patch (a tower that pools or merges patches, Swin) and is kept whole.
MAX_PREFIX_TOKENS = 8


def num_cls_tokens(vision: nn.Module, seq_len: int, image_hw: tuple[int, int]) -> int:
    """How many tokens come before the patch grid in the tower's output of `seq_len` tokens for images of `image_hw`
    (H, W) pixels: 1 for a CLS (CLIP, ViT, DINOv2), 1 + registers (DINOv2 with registers), 2 for DeiT's CLS and
    distillation tokens, 0 for SigLIP and for towers whose output is not a patch grid. Counted from the input's grid,
    not the config's `image_size`: DINOv2's config says 518 px where its image processor crops 224."""
    patch = getattr(getattr(vision, "config", None), "patch_size", None)
    patch_h, patch_w = (patch[0], patch[-1]) if isinstance(patch, (list, tuple)) and patch else (patch, patch)
    if not (isinstance(patch_h, int) and isinstance(patch_w, int) and patch_h > 0 and patch_w > 0):
        return 0
    prefix = seq_len - (image_hw[0] // patch_h) * (image_hw[1] // patch_w)
    return prefix if 0 <= prefix <= MAX_PREFIX_TOKENS else 0


def vision_features(vision: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -1,
                    drop_cls: bool = True) -> torch.Tensor:
    """pixel_values (M, C, H, W) -> patch features (M, S, Dv) from the tower's output or one of its hidden states;
    `drop_cls`: without the tokens before the patch grid (`num_cls_tokens`)."""
    if feature_layer == -1:
        hidden = vision(pixel_values=pixel_values).last_hidden_state
    else:
        hidden = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[feature_layer]
    if hidden.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"the vision tower {type(vision).__name__} returned {hidden.shape[0]} rows for "
                         f"{pixel_values.shape[0]} frames: it packs the images into one sequence (Pixtral's does); "
                         "give a tower that returns one patch grid per image")
    if drop_cls:
        hidden = hidden[:, num_cls_tokens(vision, hidden.shape[1], tuple(pixel_values.shape[-2:])):]
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
