"""Multimodal-GPT checkpoints (Gong et al. 2023, open-mmlab/Multimodal-GPT) -> our model.

Multimodal-GPT is OpenFlamingo-9B v1 (CLIP ViT-L/14, LLaMA-7B) instruction-tuned with LoRA: its released file
(`mmgpt-lora-v0-release.pt`) holds only LoRA tensors, `{"model_state_dict": ..., "tuning_config": ...}`, applied by
PEFT to the wrapped LM (`lang_encoder`) on top of OpenFlamingo-9B v1's `checkpoint.pt`. Its config targets the LM's
attention projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`) and the gated blocks' (`to_q`, `to_kv`, `to_out`,
`ff.1`, `ff.3`), r = alpha = 16, no dropout. The conversion:
- the blocks' adapters are merged into the base checkpoint's block weights (W + alpha/r * B A): the blocks are our
  trained tensors, so the merged weights are simply theirs;
- the LM's adapters become our `lm_lora` adapters (model/lora.py), so the LM stays the LLaMA-7B the user names and
  the checkpoint stays small; `merge_lm_lora=True` folds them into the LM instead (a plain LM, saved whole);
- the rest is OpenFlamingo v1's conversion (openflamingo.py), v1's masking rule included (`attend_next_image`);
- a prompt without any image runs the LM alone (with its adapters), as Multimodal-GPT's does (its layers'
  `condition_only_lang_x`): config `imageless_rows_skip_blocks`, per row, so a batch may mix such prompts with others;
- prompts use Multimodal-GPT's format (`mmgpt` template, flamingo/chat.py).
Keys are read in the forms PEFT has written (`lora_A.weight`, `lora_A.default.weight`), behind `module.` (DDP) and
PEFT's `base_model.model.`; blocks under the wrapped decoder layers or under `gated_cross_attn_layers`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Optional, Union

import torch

from ..config import FlamingoConfig
from ..model.flamingo import Flamingo
from ..processing import FlamingoProcessor
from .adapters import merge_pair, split_lora_keys
from .checkpoints import state_dict_of, unreadable
from .openflamingo import (
    CLIP_VIT_L,
    PUBLISHED_V1,
    canonical_key,
    convert_openflamingo,
    load_openflamingo_state,
    published_openflamingo,
)

MMGPT_LORA_URL = "https://download.openmmlab.com/mmgpt/v0/mmgpt-lora-v0-release.pt"  # the released adapters
MMGPT_BASE = "openflamingo/OpenFlamingo-9B-deprecated"  # OpenFlamingo-9B v1, which they were trained on
_BLOCK = re.compile(r"^(?:.+\.(\d+)\.gated_cross_attn_layer|gated_cross_attn_layers\.(\d+))\.(.+)$")


def finetune_file(source: Union[str, os.PathLike]) -> str:
    """A local path, or an http(s) URL downloaded once into torch's hub cache (`torch.hub.get_dir()/checkpoints`,
    as torchvision's weights are), with a progress bar."""
    source = str(source)
    if not source.startswith(("http://", "https://")):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Multimodal-GPT checkpoint not found: {source}")
        return source
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(source.split("?")[0]))
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        torch.hub.download_url_to_file(source, target, progress=True)  # a temporary file, renamed when complete
    return target


class _ConfigDict:
    """Stands in for mmengine's `ConfigDict` (an addict `Dict`) while a checkpoint is unpickled: becomes an
    OrderedDict of its items (a type the weights-only unpickler fills and builds). Both of its pickled forms load:
    addict's (`__new__` with the items, then the items again, then its state) and mmengine's later `__reduce_ex__`
    (called with a dict)."""

    def __new__(cls, *args: Any) -> Any:
        if len(args) == 1 and isinstance(args[0], dict):
            return OrderedDict(args[0])
        return OrderedDict(args)


class _Config:
    """Stands in for mmengine's `Config`, whose pickled state is (its ConfigDict, filename, text, ...)."""

    def __setstate__(self, state: tuple) -> None:
        self.cfg_dict = state[0]


# what Multimodal-GPT's training saves as `tuning_config` (`Config.fromfile(...)`, or its inner ConfigDict): classes
# allowed by name to the weights-only unpickler, bound to the stand-ins above, so that no code of theirs runs
_MMENGINE_GLOBALS = [(_ConfigDict, "mmengine.config.config.ConfigDict"), (_Config, "mmengine.config.config.Config")]


def _lora_settings(tuning: Any) -> dict[str, Any]:
    """The LoRA settings of a tuning config: a dict, a ConfigDict, or a whole Config holding `tuning_config`."""
    if isinstance(tuning, _Config):
        tuning = tuning.cfg_dict
    if isinstance(tuning, dict) and "lora_r" not in tuning and isinstance(tuning.get("tuning_config"), dict):
        tuning = tuning["tuning_config"]
    return dict(tuning) if isinstance(tuning, dict) else {}


def read_finetune(source: Union[str, os.PathLike, dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Multimodal-GPT checkpoint -> (its tensors under the wrapped LM's names, `lang_encoder.` kept and PEFT's
    `base_model.model.` and DDP's `module.` removed; its LoRA settings). Read weights-only: no pickle code runs (its
    mmengine config objects are read as data)."""
    if isinstance(source, dict):
        checkpoint = source
    else:
        path = finetune_file(source)
        try:
            with torch.serialization.safe_globals(_MMENGINE_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise unreadable(str(path), e) from e
    where = "the Multimodal-GPT checkpoint" if isinstance(source, dict) else str(path)
    checkpoint = state_dict_of(checkpoint, where)
    state = state_dict_of(checkpoint.get("model_state_dict", checkpoint), where)
    tuning = _lora_settings(checkpoint.get("tuning_config"))
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.").replace("lang_encoder.base_model.model.", "lang_encoder.")
        tensors[key] = value
    if not any(".lora_" in k for k in tensors):
        raise ValueError("not a Multimodal-GPT checkpoint: no LoRA tensors (`*.lora_A.*`) in it")
    return tensors, tuning


def _scale(tuning: dict[str, Any], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA ranks differ across modules ({sorted(ranks)}); one rank expected")
    r = ranks.pop()
    if tuning.get("lora_r", r) != r:
        raise ValueError(f"tuning_config says lora_r={tuning['lora_r']}, the tensors have rank {r}")
    alpha = tuning.get("lora_alpha")
    if alpha is None:
        raise ValueError("the checkpoint has no tuning_config.lora_alpha: the adapters' scale is unknown")
    return r, float(alpha)


def convert_mmgpt(finetune: Union[str, os.PathLike, dict], base: Union[str, os.PathLike, dict], lm: Any,
                  tokenizer: Any = None, *, vision: Any = CLIP_VIT_L, image_processor: Any = None,
                  merge_lm_lora: bool = False) -> tuple[Flamingo, FlamingoProcessor]:
    """Our model + processor of a Multimodal-GPT checkpoint (`finetune`: file, URL or loaded dict) on OpenFlamingo v1
    (`base`: its `checkpoint.pt` or state dict) and LLaMA-7B (`lm`: a directory or model, the tokenizer's too unless
    `tokenizer` is given). The module docstring says how."""
    tensors, tuning = read_finetune(finetune)
    keys, others = split_lora_keys(tensors)
    pairs = {module: (tensors[a], tensors[b]) for module, (a, b) in keys.items()}
    r, alpha = _scale(tuning, pairs)
    state = dict(load_openflamingo_state(base))
    blocks, lm_adapters = {}, {}
    for path, (a, b) in pairs.items():
        inner = path.removeprefix("lang_encoder.")
        m = _BLOCK.match(inner)
        if m:
            blocks[f"lang_encoder.gated_cross_attn_layers.{m.group(1) or m.group(2)}.{m.group(3)}.weight"] = (a, b)
        else:
            lm_adapters[inner.replace(".decoder_layer.", ".")] = (a, b)
    for key, (a, b) in blocks.items():
        if key not in state:
            raise ValueError(f"the checkpoint adapts {key!r}, which the OpenFlamingo checkpoint lacks")
        state[key] = merge_pair(state[key], a, b, alpha / r, key)
    for key in others.values():  # modules it trained whole (`unfrozen`)
        if canonical_key(key) not in state:
            raise ValueError(f"the checkpoint trains {key!r} whole, which the conversion cannot place")
        state[canonical_key(key)] = tensors[key]

    config = FlamingoConfig(imageless_rows_skip_blocks=True)
    if lm_adapters:
        targets = sorted({path.rpartition(".")[2] for path in lm_adapters})
        config.lm_lora = {"r": r, "alpha": alpha, "target_modules": targets, "dropout": 0.0}
    model, processor = convert_openflamingo(state, vision, lm, tokenizer, image_processor=image_processor,
                                            config=config, template="mmgpt", attend_next_image=True)
    if lm_adapters:
        _load_lm_adapters(model, lm_adapters)
        if merge_lm_lora:
            model.merge_lora()
    return model, processor


def _load_lm_adapters(model: Flamingo, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy the LM's adapters into the ones `config.lm_lora` injected: every injected adapter must be given."""
    ours = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    given = {}
    for path, (a, b) in adapters.items():
        given[f"lm.{path}.lora_A.default.weight"] = a
        given[f"lm.{path}.lora_B.default.weight"] = b
    unknown = sorted(set(given) - set(ours))
    if unknown:
        raise ValueError(f"the checkpoint adapts LM modules this LM lacks, e.g. {unknown[0]!r}")
    missing = sorted(set(ours) - set(given))
    if missing:
        raise ValueError(f"the checkpoint leaves LM adapters unset, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, value in given.items():
            if ours[name].shape != value.shape:
                raise ValueError(f"{name}: the checkpoint's shape {tuple(value.shape)} is not the LM's "
                                 f"{tuple(ours[name].shape)}")
            ours[name].copy_(value)


def published_base(name_or_path: Optional[str]) -> Union[str, os.PathLike]:
    """The OpenFlamingo v1 checkpoint Multimodal-GPT sits on: a file, or a published v1 name (downloaded once)."""
    source = name_or_path or MMGPT_BASE
    if os.path.exists(source) or source not in PUBLISHED_V1:
        return source
    return published_openflamingo(source)[0]
