"""The model card (`README.md`) a saved Flamingo carries: what it is built from, what trained, how to load, generate
with and serve it, and the Hub's metadata (library, task, base models) in its YAML header. Written from the saved
files alone, so that pushing a directory can name the card after its repository."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import textwrap
from typing import Any, Optional

import yaml
from safetensors import SafetensorError, safe_open

from ..config import BACKBONE_DIRS, PROCESSOR_CONFIG_NAME, WEIGHTS_NAME, FlamingoConfig
from ..runtime.hub import is_hub_name
from . import lora

CARD_NAME = "README.md"


def _parameters(weights: str) -> dict[str, int]:
    """Parameters per part of the tensors stored beside the backbones (the file's header only)."""
    parts = {"resampler": 0, "blocks": 0, "rows": 0, "lora": 0, "other": 0}
    with safe_open(weights, "pt") as f:
        for key in f.keys():
            numel = math.prod(f.get_slice(key).get_shape())
            part = ("lora" if lora.is_adapter_key(key) else "resampler" if key.startswith("resampler.")
                    else "blocks" if key.startswith("xattn.") else "rows" if key.startswith("new_") else "other")
            parts[part] += numel
    return parts


def _lm_layers(directory: str) -> Optional[int]:
    """The saved LM's layer count (from `lm/config.json`), when the backbones are in the directory."""
    path = os.path.join(directory, "lm", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lm_config: dict[str, Any] = json.load(f)
    lm_config = lm_config.get("text_config") or lm_config
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(lm_config.get(key), int):
            return lm_config[key]
    return None


def _amount(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def _placement(config: FlamingoConfig, layers: Optional[int]) -> str:
    if layers is not None:
        indices = config.xattn_layer_indices(layers)
        return f"before {len(indices)} of the LM's {layers} layers ({', '.join(map(str, indices))})"
    if config.xattn_layers is not None:
        return f"before the LM's layers {', '.join(map(str, config.xattn_layers))}"
    n = config.xattn_every
    if n == 1:
        return "before every layer of the LM"
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"before every {n}{suffix} layer of the LM"


def _summary(config: FlamingoConfig) -> str:
    """The card's opening paragraph, from the config (as the table is): which parts are frozen or trained, the
    resampler's kind, gated or plain blocks."""
    vision = "frozen" if config.freeze_vision else "trained"
    lm = "a frozen" if config.freeze_lm else "a trained"
    if config.freeze_lm and config.lm_lora:
        lm += " (LoRA-adapted)"
    resampler = "a Perceiver Resampler" if config.resampler == "perceiver" else "an MLP resampler"
    blocks = "gated cross-attention blocks" if config.gated else "cross-attention blocks (ungated)"
    return textwrap.fill(
        f"A Flamingo-style visual language model (Alayrac et al., NeurIPS 2022): a {vision} vision tower encodes "
        f"each image (or each video frame), {resampler} maps its features to a few visual tokens, and {blocks} "
        f"inserted into {lm} causal LM let the text attend to them. `<image>` marks each image in a prompt and "
        "`<|endofchunk|>` ends a chunk of interleaved text; it is used few-shot, with examples in the prompt.",
        width=116, break_on_hyphens=False, break_long_words=False)


def _backbone(ref: Optional[str], revision: Optional[str], part: str) -> str:
    """A backbone as the card names it: its name/path (a Hub name with the commit it loads at), or its folder."""
    if not ref:
        return f"saved in `{part}/`"
    return f"`{ref}`" + (f" at commit `{revision[:12]}`" if revision and is_hub_name(str(ref)) else "")


def _local_backbones(directory: str, config: FlamingoConfig) -> list[str]:
    """The parts ("vision", "lm") of the model saved in `directory` that are stored in their own folder and whose
    config reference is a local path (not a Hub name, or a Hub-shaped path that exists here): published, such a path
    names a folder of the builder's machine that nobody else has, and the backbone is loaded from its folder anyway,
    so a push drops it (`published_config`)."""
    refs = {"vision": (config.vision_name_or_path, config.vision_revision),
            "lm": (config.lm_name_or_path, config.lm_revision)}
    # a Hub-shaped reference with a recorded commit was read from the Hub (`vision_revision` / `lm_revision`),
    # whatever folder of that name the pushing directory happens to hold
    return [part for part, (ref, revision) in refs.items() if ref and os.path.isdir(os.path.join(directory, part))
            and (not is_hub_name(str(ref)) or (revision is None and os.path.exists(str(ref))))]


def published_config(directory: str, config: FlamingoConfig) -> FlamingoConfig:
    """`config` as a push publishes it: the references of `_local_backbones` cleared (with their revisions), so the
    repository names no local path; the backbones load from `vision/` and `lm/` as before."""
    dropped = {f"{part}_{key}": None for part in _local_backbones(directory, config)
               for key in ("name_or_path", "revision")}
    return dataclasses.replace(config, **dropped) if dropped else config


def model_card(directory: str, name: str, *, published: bool = False) -> str:
    """The card of the model saved in `directory`, loaded as `name` (a Hub repository or a path) in its examples.
    published: the card a push writes, of `published_config` (no local backbone paths)."""
    config = FlamingoConfig.load(directory)
    if published:
        config = published_config(directory, config)
    full = all(os.path.isdir(os.path.join(directory, part)) for part in BACKBONE_DIRS)
    parts = _parameters(os.path.join(directory, WEIGHTS_NAME))
    bases = [b for b in (config.vision_name_or_path, config.lm_name_or_path) if b and is_hub_name(str(b))]
    meta: dict[str, Any] = {"library_name": "flamingo", "pipeline_tag": "image-text-to-text",
                            "tags": ["flamingo", "vision-language", "few-shot", "multimodal"]}
    if bases:
        meta["base_model"] = bases
    vision = _backbone(config.vision_name_or_path, config.vision_revision, "vision")
    lm = _backbone(config.lm_name_or_path, config.lm_revision, "lm")
    frozen = "frozen" if config.freeze_lm else "trained"
    if config.lm_lora:
        frozen += f", with LoRA adapters (r={config.lm_lora.get('r')}) trained"
    changed = [k for k in config.extra_saved_weights if k.startswith("lm.")]  # a merged LoRA's, a fine-tuned table
    if changed:
        frozen += (f"; {len(changed)} of its weight tensors differ from the base's (a merged LoRA's or a fine-tuned "
                   "embedding table) and are stored with this model")
    rows = [
        ("vision tower", f"{vision} ({'frozen' if config.freeze_vision else 'trained'})"),
        ("language model", f"{lm} ({frozen})"),
        ("visual tokens per image", f"{config.num_latents} ({config.resampler} resampler)"),
        ("cross-attention blocks", f"{config.block} blocks {_placement(config, _lm_layers(directory))}"
                                   + (", tanh gates" if config.gated else ", ungated")),
        ("each text token sees", "the next image after it, none after the last (OpenFlamingo v1's rule)"
         if config.attend_next_image else ("the last image or image reference before it"
                                           if config.num_image_references else "the last image before it")
         if config.only_attend_last_image else "every image before it"),
        *([("prompts without an image", "the LM alone: the blocks are skipped (Multimodal-GPT's rule)")]
          if config.imageless_rows_skip_blocks else []),
        ("parameters stored beside the backbones",
         f"{_amount(sum(parts.values()))}: resampler {_amount(parts['resampler'])}, blocks "
         f"{_amount(parts['blocks'])}, added tokens' rows {_amount(parts['rows'])}"
         + (f", LoRA {_amount(parts['lora'])}" if parts["lora"] else "")
         + (f", other trained LM/tower tensors {_amount(parts['other'])}" if parts["other"] else "")),
        ("checkpoint", "full: the backbones are in `vision/` and `lm/`" if full
         else "trained tensors only: the backbones are loaded by the names above"),
    ]
    if config.quantize_frozen != "none":
        rows.append(("frozen weights", f"quantized to {config.quantize_frozen} when loaded"))
    if config.num_image_references:
        rows.append(("image references", f"`<image0>` ... `<image{config.num_image_references - 1}>` (MMICL-style)"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    template = _template(directory)
    prompt = {"otter": "<image>User: What is in the picture? GPT:<answer>",  # its format (flamingo/chat.py)
              "mmgpt": "Below is an instruction that describes a task. Write a response that appropriately completes "
                       "the request.\\n\\n### Image:\\n<image>\\n\\n### Instruction:\\nWhat is in the picture?"
                       "\\n\\n### Response:\\n",
              "idefics": "User:<image>What is in the picture?<end_of_utterance>\\nAssistant:"}.get(
        template, "<image>Question: what is in the picture? Short answer:")
    if os.path.isfile(os.path.join(directory, "tokenizer_config.json")):  # saved with its processor
        load = f'from flamingo import load_pretrained\n\nmodel, processor = load_pretrained("{name}")'
    else:
        load = (f'from flamingo import Flamingo, FlamingoProcessor\n\nmodel = Flamingo.from_pretrained("{name}")\n'
                f'processor = FlamingoProcessor.from_pretrained(...)  # saved without one: the tokenizer and image '
                f'processor it was trained with')
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {name.rstrip("/").split("/")[-1]}

{_summary(config)}

| | |
|---|---|
{table}

## Use

With the `flamingo` package:

```python
{load}
prompt = "{prompt}"
batch = processor(prompt, images=["photo.jpg"])
ids = model.generate(**batch, max_new_tokens=10)
print(processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
```

An OpenAI-compatible server with a page to try it:

```bash
flamingo serve --model {name}
```
""" + ("" if template == "flamingo" else f"""
Chat messages (the server, `flamingo generate --chat`) are written in the model's {template} format.
""")


def generated_for(directory: str, text: str) -> Optional[str]:
    """The name `text` is `model_card(directory, name)` for, or None when it is not such a card (edited by hand, or
    written for other files). The candidate names are read off the card itself (its `flamingo serve --model NAME`
    line, then its heading), not taken from the directory's name: save_pretrained names the card after the
    directory, which may have been renamed or copied since (`final/` pushed as `my-model`). Either card: as saved, or
    as a push publishes it (`published`)."""
    names = re.findall(r"^flamingo serve --model (.+)$", text, re.M) + re.findall(r"^# (.+)$", text, re.M)[:1]
    for name in dict.fromkeys(names):
        if text == model_card(directory, name) or text == model_card(directory, name, published=True):
            return name
    return None


def _template(directory: str) -> str:
    """The prompt template of the processor saved with the model (flamingo, otter, idefics, mmgpt)."""
    path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
    if not os.path.isfile(path):
        return "flamingo"
    with open(path, encoding="utf-8") as f:
        return str(json.load(f).get("template", "flamingo"))


def edited_card(directory: str) -> Optional[str]:
    """The card of the earlier save in `directory` when it is not one that save's files give (`generated_for`:
    edited by hand, or written by another version), which a save over it keeps, as a push keeps an edited card. None
    when there is none, or it is generated (a save writes its own anew)."""
    path = os.path.join(directory, CARD_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    try:
        return None if generated_for(directory, text) is not None else text
    except (OSError, ValueError, SafetensorError):  # an earlier save whose files cannot be read: keep what is there
        return text
