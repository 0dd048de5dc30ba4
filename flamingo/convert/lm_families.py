"""The LMs of the published OpenFlamingo checkpoints, on classes that transformers ships (no `trust_remote_code`).

- OpenFlamingo 3B (mpt1b): anas-awadalla/mpt-1b-redpajama-200b(-dolly), remote code `mosaic_gpt` ->
  `MptForCausalLM` with renamed keys, when it fits (below).
- OpenFlamingo 4B (rpj3b): togethercomputer/RedPajama-INCITE-(Base|Instruct)-3B-v1, `gpt_neox` -> as is.
- OpenFlamingo 9B (mpt7b): anas-awadalla/mpt-7b, remote code `mpt` -> `MptForCausalLM`, after checking its config.
- `mpt` (MPT-7B): the remote code's key names are transformers' own, and transformers 5 builds its own class from the
  config even with the remote code's `auto_map`, but silently ignores the options its class lacks. The options are
  checked here: QK LayerNorm, biases, prefix-LM, sequence-id masking, learned positions, a logit scale, a non-GELU or
  non-4x MLP, no ALiBi: any of them makes transformers' class compute another function, so the load refuses.
- `mosaic_gpt` (MPT-1B, MosaicML's earlier code): renamed keys (`ln_1` -> `norm_1`, `ln_2` -> `norm_2`,
  `mlp.mlp_up` -> `ffn.up_proj`, `mlp.mlp_down` -> `ffn.down_proj`, `ln_f` -> `norm_f`) and config fields
  (`mlp_ratio`, `attn_qk_ln`, `attn_clip_qkv`, `alibi`, ...), then the same checks. Its model card says it uses QK
  LayerNorm, which no transformers class implements with ALiBi: such a checkpoint is refused with that reason.
Weights are read from safetensors, or `.bin` files with `torch.load(weights_only=True)` (no pickle code runs).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Union

import torch
from transformers import AutoModelForCausalLM, MptConfig, MptForCausalLM, PreTrainedModel

from .checkpoints import local_dir, read_tensors

_FILES = ["*.json", "*.safetensors", "*.bin", "tokenizer*", "*.txt", "*.model"]
# MosaicGPT (mpt-1b-redpajama-200b) -> transformers' MPT: key renames
MOSAIC_GPT_KEYS = [(r"\.ln_1\.", ".norm_1."), (r"\.ln_2\.", ".norm_2."), (r"\.mlp\.mlp_up\.", ".ffn.up_proj."),
                   (r"\.mlp\.mlp_down\.", ".ffn.down_proj."), (r"\.ln_f\.", ".norm_f.")]


def mpt_config_from_mosaic_gpt(remote: dict[str, Any]) -> dict[str, Any]:
    """MosaicGPT's config fields -> the remote MPT config's (then checked and built as for MPT-7B)."""
    attn = {"alibi": remote.get("alibi", False), "alibi_bias_max": remote.get("alibi_bias_max", 8),
            "clip_qkv": remote.get("attn_clip_qkv"), "qk_ln": remote.get("attn_qk_ln", False),
            "softmax_scale": remote.get("softmax_scale"), "prefix_lm": remote.get("prefix_lm", False),
            "attn_uses_sequence_id": remote.get("attn_uses_sequence_id", False)}
    return {"d_model": remote["d_model"], "n_heads": remote["n_heads"], "n_layers": remote["n_layers"],
            "expansion_ratio": remote.get("mlp_ratio", 4), "max_seq_len": remote["max_seq_len"],
            "vocab_size": remote["vocab_size"], "attn_config": attn, "logit_scale": remote.get("logit_scale"),
            "no_bias": remote.get("no_bias", False), "embedding_fraction": remote.get("embedding_fraction", 1.0),
            "learned_pos_emb": not attn["alibi"]}


def check_mpt(remote: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Refuse what transformers' `MptForCausalLM` would silently compute differently."""
    attn = remote.get("attn_config") or {}
    problems = []
    if attn.get("qk_ln"):
        problems.append("QK LayerNorm (attn qk_ln)")
    if not attn.get("alibi", True):
        problems.append("learned positions instead of ALiBi")
    if attn.get("prefix_lm") or attn.get("attn_uses_sequence_id"):
        problems.append("prefix-LM / sequence-id attention")
    if attn.get("rope"):
        problems.append("rotary positions")
    if remote.get("expansion_ratio", 4) != 4:
        problems.append(f"an MLP of {remote['expansion_ratio']}x (transformers' is 4x)")
    if (remote.get("ffn_config") or {}).get("ffn_type", "mptmlp") != "mptmlp":
        problems.append(f"ffn_type {remote['ffn_config']['ffn_type']!r}")
    if remote.get("logit_scale") not in (None, 1, 1.0):
        problems.append(f"logit_scale {remote['logit_scale']!r}")
    if remote.get("embedding_fraction", 1.0) != 1.0:
        problems.append("embedding_fraction != 1")
    if any(".wpe." in k for k in state):
        problems.append("a learned position table (wpe)")
    biases = [k for k, v in state.items() if k.endswith(".bias") and bool(v.any())]
    if biases:
        problems.append(f"non-zero biases ({biases[0]}, ...; transformers' MPT has none)")
    if problems:
        raise ValueError("this MPT checkpoint uses " + ", ".join(problems) + ": transformers' MptForCausalLM does "
                         "not implement it and would compute a different function (load it with its remote code "
                         "instead)")


def load_openflamingo_lm(source: Union[str, os.PathLike], *, torch_dtype: Optional[torch.dtype] = None
                         ) -> PreTrainedModel:
    """An OpenFlamingo LM (hub name or directory) on a class transformers ships. Returns it in eval mode, with
    `name_or_path` set when `AutoModelForCausalLM.from_pretrained` can load the same model back (so trained-only
    checkpoints can refer to it), empty when the load needed renamed keys."""
    directory = local_dir(str(source), _FILES, "LM")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in {directory!r}")
    with open(config_path) as f:
        remote = json.load(f)
    model_type = remote.get("model_type")
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    if model_type not in ("mpt", "mosaic_gpt"):
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        model.name_or_path = str(source)
        return model.eval()
    state = read_tensors(directory)
    if model_type == "mosaic_gpt":
        remote = mpt_config_from_mosaic_gpt(remote)
        for pattern, new in MOSAIC_GPT_KEYS:
            state = {re.sub(pattern, new, k): v for k, v in state.items()}
    check_mpt(remote, state)
    state = {k: v for k, v in state.items() if not k.endswith(".bias")}  # all zero (checked)
    known = set(MptConfig().to_dict())
    config = MptConfig(**{k: v for k, v in remote.items() if k in known and k not in ("attn_config",)},
                       attn_config={k: v for k, v in (remote.get("attn_config") or {}).items()
                                    if k in ("attn_type", "attn_pdrop", "clip_qkv", "softmax_scale", "alibi",
                                             "alibi_bias_max")})
    model = MptForCausalLM._from_config(config, **kwargs)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"MPT checkpoint does not match transformers' MPT: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    model.name_or_path = str(source) if model_type == "mpt" else ""
    return model.eval()
