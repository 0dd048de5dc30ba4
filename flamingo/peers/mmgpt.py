"""The Multimodal-GPT peer (mmgpt 0.0.1, open-mmlab), built on our HF backbones, for equality tests.

mmgpt is installed from PyPI with `pip install --no-deps mmgpt==0.0.1`. Its package `__init__` imports open_clip and
bigmodelvis, so its OpenFlamingo v1 copy (`mmgpt/models/open_flamingo/`: v1's modules plus `condition_only_lang_x`)
is loaded from its files as OpenFlamingo's are (openflamingo.py). Its LoRA is what its `prepare_model_for_tuning`
does: PEFT's `get_peft_model` on the wrapped LM. Its `task_type="VL"` is refused by current PEFT versions; without a
task type PEFT builds the same adapters in a plain `PeftModel`.
"""

from __future__ import annotations

import importlib.util
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from .openflamingo import load_modules

_PACKAGE = "_mmgpt_peer"
# Multimodal-GPT's configs/lora_config.py
LORA_CONFIG = {"lora": True, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv",
                                                     "to_out", "ff.1", "ff.3"],
               "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "vis": True, "unfrozen": []}


@lru_cache(maxsize=1)
def load_mmgpt_modules() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("mmgpt")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Multimodal-GPT is not installed: pip install --no-deps mmgpt==0.0.1 einops einops-exts")
    return load_modules(Path(list(spec.submodule_search_locations)[0]) / "models" / "open_flamingo", _PACKAGE)


def apply_mmgpt_lora(model: nn.Module, tuning_config: dict[str, Any] = LORA_CONFIG) -> nn.Module:
    """Multimodal-GPT's `prepare_model_for_tuning` on an OpenFlamingo v1 model built from `load_mmgpt_modules()`
    (`build_openflamingo(..., modules=...)`): PEFT's LoRA on its wrapped LM (fresh adapters: `lora_B` zero); returns
    the model."""
    import peft

    config = peft.LoraConfig(r=tuning_config["lora_r"], lora_alpha=tuning_config["lora_alpha"],
                             target_modules=tuning_config["lora_target_modules"],
                             lora_dropout=tuning_config["lora_dropout"], bias="none", modules_to_save=[])
    model.lang_encoder = peft.get_peft_model(model.lang_encoder, peft_config=config)
    return model
