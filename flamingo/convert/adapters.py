"""PEFT LoRA adapters of a published checkpoint (an IDEFICS fine-tune, as Hugging Face's IDEFICS notebooks make
them), merged into its tensors as a conversion reads them.

A PEFT adapter directory (or Hub repository) holds `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`,
`rank_pattern`, `alpha_pattern`, `use_rslora`, `fan_in_fan_out`, `base_model_name_or_path`) and
`adapter_model.safetensors` (or `.bin`): `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r) per adapted Linear, and `base_model.model.<module>.<param>` for the modules it trained whole
(`modules_to_save`). Merged, an adapted weight is W + s·B·A (Bᵀ·Aᵀ transposed for `fan_in_fan_out`), s = alpha / r
(alpha / sqrt(r) with rsLoRA), each module's r and alpha from the patterns where they name it: what PEFT's
`merge_and_unload` computes. The converted model then holds the fine-tune's weights everywhere (vision tower, LM,
resampler and blocks alike) and refers to no base by name. DoRA, LoRA biases, embedding and convolution adapters,
trainable tokens and parameter targets are refused with their name, never silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from .checkpoints import CheckpointTensors, state_dict_of, unreadable

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LORA = re.compile(r"^(.*)\.lora_([AB])(?:\.([^.]+))?\.weight$")  # module, A or B, PEFT's adapter name if any
# adapter_config.json options whose effect merging as above would not reproduce: (option, value that is harmless)
_REFUSED = (("use_dora", False), ("lora_bias", False), ("layer_replication", None), ("trainable_token_indices", None),
            ("target_parameters", None))


def is_adapter_dir(directory: str) -> bool:
    """A PEFT adapter (its config, and no model config of its own)."""
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG)) and \
        not os.path.isfile(os.path.join(directory, "config.json"))


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first pattern the module's name ends with."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def split_lora_keys(keys: Iterable[str], rename: Callable[[str], str] = lambda key: key
                    ) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Tensor keys of a PEFT-saved LoRA -> (module -> its (lora_A, lora_B) keys, every other tensor's name -> its key),
    names as `rename` gives them. One adapter name (`default`, or none in PEFT's oldest format), every pair complete,
    Linear adapters only: a ValueError otherwise, never a guess."""
    pairs: dict[str, dict[str, str]] = {}
    others: dict[str, str] = {}
    adapters = set()
    for key in keys:
        name = rename(key)
        m = _LORA.match(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = key
            adapters.add(m.group(3))
        elif ".lora_" in name:
            raise ValueError(f"{key!r}: only Linear LoRA adapters (lora_A / lora_B) merge here")
        else:
            others[name] = key
    if len(adapters) > 1:  # which one was active is not in the checkpoint
        raise ValueError(f"the checkpoint holds several LoRA adapters {sorted(a or '' for a in adapters)}; one merges")
    unpaired = sorted(module for module, ab in pairs.items() if set(ab) != {"A", "B"})
    if unpaired:
        raise ValueError(f"LoRA tensors without their pair: {unpaired[:3]}")
    return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}, others


def merge_pair(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, name: str,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """W + scale·B·A (A (r, in), B (out, r); transposed for GPT-2-style (in, out) weights), computed in float32 and
    returned in W's dtype: what PEFT's merge computes."""
    update = scale * (b.float() @ a.float())  # (out, in)
    update = update.T if fan_in_fan_out else update
    if update.shape != weight.shape:
        raise ValueError(f"the LoRA update of {name!r} is {tuple(update.shape)}, the weight {tuple(weight.shape)}")
    return (weight.float() + update).to(weight.dtype)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: per adapted weight of the base model (its state-dict name), the update s·B·A."""

    directory: str
    base: Optional[str]  # base_model_name_or_path
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # weight name -> (A (r, in), B (out, r), scale)
    replaced: dict[str, torch.Tensor]  # modules_to_save: base tensor name -> the adapter's tensor
    fan_in_fan_out: bool = False
    used: set[str] = field(default_factory=set)

    def merged(self, tensors: CheckpointTensors) -> CheckpointTensors:
        """`tensors` with this adapter merged into each as it is read (its `modules_to_save` tensors in their place),
        cast as `tensors` casts them."""
        stored = tensors.cast(None)

        def read(name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
            if name in self.replaced:
                self.used.add(name)
                tensor = self.replaced[name]
                return tensor.to(dtype=dtype or tensor.dtype, copy=True)
            tensor = stored[name]
            if name in self.lora:
                self.used.add(name)
                tensor = merge_pair(tensor, *self.lora[name], name, self.fan_in_fan_out)
            return tensor.to(dtype=dtype or tensor.dtype)

        return CheckpointTensors({name: tensors.dtype_of(name) for name in tensors}, read, tensors.dtype,
                                 tensors.where)

    def check_used(self) -> None:
        """Raise when a tensor of the adapter named no tensor the conversion read (a module the base lacks)."""
        unused = sorted((set(self.lora) | set(self.replaced)) - self.used)
        if unused:
            raise ValueError(f"the adapter {self.directory!r} adapts tensors the conversion never read, e.g. "
                             f"{unused[0]!r}: is it an adapter of this base model?")


def read_lora_adapter(directory: str) -> LoraAdapter:
    """The LoRA adapter in `directory` (its config read and checked, its tensors loaded: they are small)."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    config = read_adapter_config(path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory!r} holds a {config.get('peft_type')} adapter; only LoRA adapters merge")
    for option, harmless in _REFUSED:
        if config.get(option, harmless) not in (harmless, [], {}):
            raise ValueError(f"the adapter uses {option}={config[option]!r}, which merging as LoRA would not "
                             "reproduce: merge it with PEFT's merge_and_unload and convert the merged model")
    if config.get("bias", "none") != "none":
        raise ValueError(f"the adapter trains biases (bias={config['bias']!r}): merge it with PEFT first")
    for key in ("r", "lora_alpha"):  # the scale lora_alpha / r: no default would be the adapter's
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (key == "r" and value <= 0):
            raise ValueError(f"{path!r} gives no {'positive ' if key == 'r' else ''}{key!r} (it has {value!r}): the "
                             "LoRA scale lora_alpha / r is unknown")
    tensors = _adapter_tensors(directory)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    pairs, others = split_lora_keys(tensors, lambda key: key.removeprefix(_PREFIX))
    replaced = {name: tensors[key] for name, key in others.items()}
    lora = {}
    for module, (a_key, b_key) in pairs.items():
        a, b = tensors[a_key], tensors[b_key]
        rank = _pattern_value(config.get("rank_pattern") or {}, module, r)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"the adapter's {module!r} has rank {a.shape[0]}, its config says {rank}")
        module_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        scale = module_alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        lora[f"{module}.weight"] = (a, b, scale)
    if not lora and not replaced:
        raise ValueError(f"the adapter in {directory!r} holds no tensors")
    return LoraAdapter(directory, config.get("base_model_name_or_path"), lora, replaced,
                       bool(config.get("fan_in_fan_out")))


def read_adapter_config(path: str) -> dict[str, Any]:
    """A PEFT `adapter_config.json`: a JSON object, or a ValueError naming the file."""
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON (truncated?): {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} holds {type(config).__name__}, not an adapter config object")
    return config


def _adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """`adapter_model.safetensors`, else `adapter_model.bin` read weights-only: those files alone (a training
    checkpoint's directory also holds its optimizer state and pickled arguments)."""
    path = os.path.join(directory, ADAPTER_WEIGHTS[0])
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or damaged?): {e}") from e
    path = os.path.join(directory, ADAPTER_WEIGHTS[1])
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} holds no {' or '.join(ADAPTER_WEIGHTS)}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unreadable(path, e) from e
    return dict(state_dict_of(loaded, path))


_WRAPPED = re.compile(r"base_model\.model\.")  # PEFT's wrapper in a saved module's names (its first occurrence)


def merge_saved_peft(tensors: CheckpointTensors, alpha: float) -> CheckpointTensors:
    """A checkpoint that saved a PEFT-wrapped module whole (Otter's `lora_config`: its LM under `get_peft_model`):
    the module's own names restored (PEFT's `base_model.model.` and `.base_layer` removed), each LoRA pair merged into
    its weight (W + alpha / r · B·A, r from the pair) as it is read, and the pairs dropped."""
    pairs, rename = split_lora_keys(tensors, lambda key: _WRAPPED.sub("", key, count=1).replace(".base_layer.", "."))
    stored = tensors.cast(None)
    lora = {}  # the restored weight's name -> (A, B, alpha / r)
    for module, (a_key, b_key) in pairs.items():
        if f"{module}.weight" not in rename:
            raise ValueError(f"the checkpoint's LoRA of {module!r} has no base weight")
        a, b = stored[a_key], stored[b_key]
        lora[f"{module}.weight"] = (a, b, alpha / a.shape[0])

    def read(name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
        tensor = stored[rename[name]]
        if name in lora:
            tensor = merge_pair(tensor, *lora[name], name)
        return tensor.to(dtype=dtype or tensor.dtype)

    return CheckpointTensors({name: tensors.dtype_of(key) for name, key in rename.items()}, read,
                             where=tensors.where)
