"""One loader for every command that takes `--model`: a model saved here (`load_pretrained`), or a published
checkpoint of another family, converted in memory on each load (`flamingo convert` saves the conversion once).

What a source is, from its files (a directory, or a Hub repository's configs, fetched first):
- `flamingo_config.json`: a model saved here;
- a PEFT adapter (`adapter_config.json`, no `config.json`): an IDEFICS fine-tune on the base its config names;
- `config.json` with `model_type` `idefics`: IDEFICS; `otter`, or `flamingo` (the Otter project's HF-format
  OpenFlamingo): Otter;
- a name of `PUBLISHED` (the OpenFlamingo 2.x releases) that is no local path: OpenFlamingo, on its published
  backbones (a local directory of that name is read as a directory, as everywhere: `runtime.hub.local_or_hub`).
OpenFlamingo v1 names need a LLaMA-7B the user names, and Multimodal-GPT a LoRA file: those go through `flamingo
convert`, which takes them. `load_processor` builds the processor `load_model` would return from the configs and
tokenizer files alone (`flamingo eval --server`: the server holds the model).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Union

import torch

from ..build import load_pretrained
from ..config import CONFIG_NAME
from ..model import quantize
from ..model.cast import to_dtype
from ..model.flamingo import Flamingo, checked_torch_dtype
from ..processing import FlamingoProcessor
from ..runtime.hub import local_dir
from .adapters import is_adapter_dir
from .idefics import from_idefics, idefics_processor_of
from .openflamingo import PUBLISHED, PUBLISHED_V1, convert_openflamingo, published_openflamingo, published_processor
from .otter import from_otter, otter_processor_of

log = logging.getLogger(__name__)

OTTER_TYPES = ("otter", "flamingo")  # Otter's model types (convert/otter.py FORMATS)


def checkpoint_format(source: str, revision: Optional[str] = None) -> str:
    """`flamingo`, `idefics`, `otter` or `open-flamingo`: which loader `source` needs (the module docstring)."""
    published = not os.path.exists(source)  # a local path wins over the Hub name it may also read as
    if published and source in PUBLISHED:
        return "open-flamingo"
    if published and source in PUBLISHED_V1:
        raise ValueError(f"{source} sits on LLaMA-7B (v1), which has no canonical hub name: convert it once with "
                         f"`flamingo convert open-flamingo --model {source} --lm LLAMA7B_DIR --out DIR`")
    directory = local_dir(source, "model", revision=revision, allow_patterns=["*.json"])  # the configs alone
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return "flamingo"
    if is_adapter_dir(directory):
        return "idefics"
    path = os.path.join(directory, "config.json")
    model_type = None
    if os.path.isfile(path):
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    if model_type == "idefics":
        return "idefics"
    if model_type in OTTER_TYPES:
        return "otter"
    raise ValueError(f"{source!r} is neither a model saved here ({CONFIG_NAME}) nor an IDEFICS, Otter or published "
                     f"OpenFlamingo checkpoint (config.json model_type: {model_type!r}); `flamingo convert --help` "
                     "lists what converts")


def load_model(source: Union[str, os.PathLike], *, revision: Optional[str] = None,
               torch_dtype: Union[torch.dtype, str, None] = None, device: Union[str, torch.device, None] = None,
               quantize_frozen: Optional[str] = None) -> tuple[Flamingo, FlamingoProcessor]:
    """A model and its processor from any source `checkpoint_format` knows; kwargs as `Flamingo.from_pretrained`'s
    (torch_dtype: a dtype or its name, "auto" as None, checked before anything is read; quantize_frozen None: the
    saved model's mode, `none` for a conversion). A conversion reads its weights in `torch_dtype` (no float32 copy
    first); `revision` is the published OpenFlamingo checkpoint's too."""
    source = os.fspath(source)
    torch_dtype = checked_torch_dtype(torch_dtype)
    kind = checkpoint_format(source, revision)
    if kind == "flamingo":
        return load_pretrained(source, revision=revision, torch_dtype=torch_dtype, device=device,
                               quantize_frozen=quantize_frozen)
    log.warning("%s is an %s checkpoint: converting it in memory, as on every load (`flamingo convert %s ... --out "
                "DIR` saves the conversion once)", source, kind, kind)
    if kind == "idefics":
        model, processor = from_idefics(source, torch_dtype=torch_dtype, revision=revision)
    elif kind == "otter":
        model, processor = from_otter(source, revision=revision, torch_dtype=torch_dtype)
    else:
        checkpoint, vision, lm = published_openflamingo(source, revision=revision)
        model, processor = convert_openflamingo(checkpoint, vision, lm, torch_dtype=torch_dtype)
    if torch_dtype is not None:
        to_dtype(model, torch_dtype)
    if device is not None:
        model.to(device)
    if quantize_frozen not in (None, "none"):
        quantize.quantize_frozen(model, quantize_frozen)
    return model.eval(), processor


def load_processor(source: Union[str, os.PathLike], revision: Optional[str] = None) -> FlamingoProcessor:
    """The processor `load_model(source)` returns, from configs, tokenizer files and preprocessor configs alone: no
    weights are fetched or read (an IDEFICS adapter's: its base's)."""
    source = os.fspath(source)
    kind = checkpoint_format(source, revision)
    if kind == "flamingo":
        return FlamingoProcessor.from_pretrained(source, revision=revision)
    if kind == "idefics":
        return idefics_processor_of(source, revision=revision)
    if kind == "otter":
        return otter_processor_of(source, revision=revision)
    return published_processor(source)
