"""The LMs of the published OpenFlamingo checkpoints, without `trust_remote_code`.

- OpenFlamingo 3B (mpt1b): anas-awadalla/mpt-1b-redpajama-200b(-dolly), remote code `mosaic_gpt` -> our
  `MosaicGPTForCausalLM` (flamingo/model/mosaic_gpt.py): transformers has no class computing MosaicGPT (biases in
  every Linear and LayerNorm, QK LayerNorm); ours keeps the checkpoint's key names, so its weights load as they are.
- OpenFlamingo 4B (rpj3b): togethercomputer/RedPajama-INCITE-(Base|Instruct)-3B-v1, `gpt_neox` -> as is.
- OpenFlamingo 9B (mpt7b): anas-awadalla/mpt-7b, remote code `mpt` -> `MptForCausalLM`, after checking its config.
- `mpt` (MPT-7B): the remote code's key names are transformers' own, and transformers 5 builds its own class from the
  config even with the remote code's `auto_map`, but silently ignores the options its class lacks. The options are
  checked here: QK LayerNorm, biases, prefix-LM, sequence-id masking, learned positions, a logit scale, a non-GELU or
  non-4x MLP, no ALiBi or ALiBi slopes for another `alibi_bias_max` than 8, a norm other than LayerNorm (RMSNorm):
  any of them makes transformers' class compute another function, so the load refuses.
Weights are read from safetensors, or `.bin` files with `torch.load(weights_only=True)` (no pickle code runs).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Union

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    MptConfig,
    MptForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from ..model.backbones import check_causal_lm_source, name_or_path_of
from ..model.mosaic_gpt import MosaicGPTConfig, MosaicGPTForCausalLM, register
from ..runtime.compat import dtype_kwargs
from ..runtime.hub import metadata_dir
from ..runtime.meta import meta_parameters
from .checkpoints import assign_all, checkpoint_dir, open_tensors


def check_mpt(remote: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Refuse what transformers' `MptForCausalLM` would silently compute differently."""
    attn = remote.get("attn_config") or {}
    problems = []
    if attn.get("qk_ln"):
        problems.append("QK LayerNorm (attn qk_ln)")
    if not attn.get("alibi", True):
        problems.append("learned positions instead of ALiBi")
    if attn.get("alibi_bias_max", 8) != 8:  # transformers builds the slopes for 8 whatever its config says
        problems.append(f"ALiBi slopes for alibi_bias_max {attn['alibi_bias_max']!r} (transformers' are for 8)")
    if attn.get("prefix_lm") or attn.get("attn_uses_sequence_id"):
        problems.append("prefix-LM / sequence-id attention")
    if attn.get("rope"):
        problems.append("rotary positions")
    if remote.get("expansion_ratio", 4) != 4:
        problems.append(f"an MLP of {remote['expansion_ratio']}x (transformers' is 4x)")
    ffn = remote.get("ffn_config") or {}
    if ffn.get("ffn_type", "mptmlp") != "mptmlp":
        problems.append(f"ffn_type {ffn['ffn_type']!r}")
    act = ffn.get("ffn_act_fn") or {}  # MPT's default: exact GELU, transformers' only activation
    if act and (not isinstance(act, dict) or act.get("name") != "gelu" or act.get("approximate", "none") != "none"):
        problems.append(f"ffn_act_fn {act!r} (transformers' MLP is exact GELU)")
    norm = remote.get("norm_type", "low_precision_layernorm")
    if norm not in ("layernorm", "low_precision_layernorm"):  # "low_precision": LayerNorm under autocast
        problems.append(f"norm_type {norm!r} (transformers' MPT computes LayerNorm)")
    if remote.get("logit_scale") not in (None, 1, 1.0):
        problems.append(f"logit_scale {remote['logit_scale']!r}")
    if remote.get("embedding_fraction", 1.0) != 1.0:
        problems.append("embedding_fraction != 1")
    if any(".wpe." in k for k in state):
        problems.append("a learned position table (wpe)")
    biases = [k for k in state if k.endswith(".bias") and bool(state[k].any())]
    if biases:
        problems.append(f"non-zero biases ({biases[0]}, ...; transformers' MPT has none)")
    if problems:
        raise ValueError("this MPT checkpoint uses " + ", ".join(problems) + ": transformers' MptForCausalLM does "
                         "not implement it and would compute a different function (load it with its remote code "
                         "instead)")


def load_openflamingo_lm(source: Union[str, os.PathLike], *, torch_dtype: Optional[torch.dtype] = None
                         ) -> PreTrainedModel:
    """An OpenFlamingo LM (hub name or directory) on a class transformers ships, in `torch_dtype` (float32 unless
    given, whatever dtype its config names: the converted blocks are float32). Returns it in eval mode, with
    `name_or_path` set when `AutoModelForCausalLM.from_pretrained` can load the same model back (so trained-only
    checkpoints can refer to it; a local directory by its absolute path), empty when the load needed renamed keys."""
    directory = checkpoint_dir(str(source), "LM")
    remote = _config_json(directory)
    model_type = remote.get("model_type")
    dtype = torch_dtype or torch.float32
    kwargs = dtype_kwargs(dtype)
    name = name_or_path_of(source) or ""
    if model_type == "mosaic_gpt":
        return load_mosaic_gpt(directory, name, **kwargs)
    if model_type != "mpt":
        check_causal_lm_source(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        model.name_or_path = name
        return model.eval()
    model = mpt_from_state(remote, open_tensors(directory).cast(dtype), **kwargs)
    model.name_or_path = name
    return model


def openflamingo_lm_config(source: Union[str, os.PathLike]) -> PretrainedConfig:
    """The config of the LM `load_openflamingo_lm(source)` builds, from its configs alone (no weights fetched)."""
    directory = metadata_dir(str(source), "LM")
    remote = _config_json(directory)
    if remote.get("model_type") == "mpt":
        return mpt_config(remote)
    if remote.get("model_type") == "mosaic_gpt":  # its `auto_map` names remote code, never run
        return MosaicGPTConfig.from_pretrained(directory)
    return AutoConfig.from_pretrained(directory)


def _config_json(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json in {directory!r}")
    with open(path) as f:
        return json.load(f)


def mpt_config(remote: dict[str, Any]) -> MptConfig:
    """MPT remote code's config (a dict) as transformers' `MptConfig`: the fields it knows."""
    known = set(MptConfig().to_dict())
    return MptConfig(**{k: v for k, v in remote.items() if k in known and k not in ("attn_config",)},
                     # not attn_pdrop: dropout acts in training only, and transformers 5.2x types it int,
                     # refusing the 0.0 some MPT configs hold
                     attn_config={k: v for k, v in (remote.get("attn_config") or {}).items()
                                  if k in ("attn_type", "clip_qkv", "softmax_scale", "alibi", "alibi_bias_max")})


def mpt_from_state(remote: dict[str, Any], state: Mapping[str, torch.Tensor], **kwargs: Any) -> MptForCausalLM:
    """MPT remote code's config (a dict) and tensors on transformers' `MptForCausalLM`, in eval mode, after
    `check_mpt`; the tensors become its parameters (it is built without random init), and every tensor must find
    its parameter and back."""
    check_mpt(remote, state)
    state = {k: state[k] for k in state if not k.endswith(".bias")}  # all zero (checked)
    config = mpt_config(remote)
    with meta_parameters():
        model = MptForCausalLM._from_config(config, **kwargs)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    assign_all(model, state, "the MPT checkpoint")
    return model.eval()


def load_mosaic_gpt(directory: str, source: str, **kwargs: Any) -> PreTrainedModel:
    """MosaicGPT's repository (config.json with its fields, `.bin` or safetensors weights under its key names) on
    `MosaicGPTForCausalLM`. Every tensor of the checkpoint must find its parameter and every parameter its tensor
    (the head is the token embedding): anything else is refused, never left at random."""
    register()  # so that `AutoModelForCausalLM.from_pretrained(source)` loads it again
    model, info = MosaicGPTForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
    if missing or info["unexpected_keys"]:
        raise ValueError(f"{source}: the checkpoint does not match MosaicGPT: missing {missing[:3]}, unexpected "
                         f"{list(info['unexpected_keys'])[:3]}")
    model.name_or_path = source
    return model.eval()
