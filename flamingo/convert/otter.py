"""Otter checkpoints (Li et al. 2023, "Otter: A Multi-Modal Model with In-Context Instruction Tuning") -> our model.

An Otter repository (e.g. `luodian/OTTER-Image-MPT7B`) is a transformers `save_pretrained` directory of Otter's
`OtterForConditionalGeneration` (config `model_type: otter`), or of the same project's Hugging Face-format OpenFlamingo
`FlamingoForConditionalGeneration` (`model_type: flamingo`, e.g. `luodian/OPENFLAMINGO-9B-HF`). Its config holds
`vision_config` (CLIP's), `text_config` (the LM's own), `cross_attn_every_n_layers` and, for video models,
`max_num_frames`. Its tensors:
- `vision_encoder.*`: a transformers `CLIPVisionModel`;
- `lang_encoder.*`: the LM with each decoder layer wrapped: `<layers>.{L}.decoder_layer.*` is the LM's layer L,
  `<layers>.{L}.gated_cross_attn_layer.*` the block before it (where (L + 1) % n == 0);
- `perceiver.*`: the resampler (`latents`, `frame_embs` for video, `layers.{i}.{norm_media, norm_latents, to_q, to_kv,
  to_out, feed_forward}`, `norm`).
Its modules compute what OpenFlamingo's do: the same Perceiver, the same gated block, each token attending to the
last image at or before it (Otter's `use_media_placement_augmentation` is off), and features = the tower's last hidden
state without CLS, before CLIP's final LayerNorm. So the tensors are renamed to OpenFlamingo's names and go through
`convert_openflamingo`, on an LM and a tower built from the checkpoint itself: Otter trains the LM's whole input
embedding (and LLaMA's head), so both are saved whole, never referred to by the base model's name.

Tokens: Otter's tokenizer is its base LM's with `<|endofchunk|>`, `<image>`, `<answer>` added in one call, then `<PAD>`
when it has no pad token (its OpenFlamingo format: without `<answer>`). Adding the same here gives the same ids; their
rows become our added rows (trained like ours). The repository's own tokenizer is used when it ships one, else the
base tokenizer Otter's code loads (`mosaicml/mpt-7b-instruct` for MPT, the LM's `_name_or_path` for LLaMA).

Known difference: Otter's `generate` feeds each cached decode step its new token alone, and its layers compute the
media locations from that step's ids, so generated tokens see no image. Here every token sees the last image before
it, as in Otter's training forward; Otter's `generate(use_cache=False)` gives the same tokens as ours
(tests/test_otter_equal.py).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..build import flamingo_processor
from ..config import FlamingoConfig
from ..model.backbones import config_max_positions
from ..model.cast import to_dtype
from ..model.flamingo import Flamingo
from ..model.mosaic_gpt import MosaicGPTConfig, MosaicGPTForCausalLM, register
from ..processing import FlamingoProcessor, load_image_processor, load_tokenizer
from ..runtime.compat import dtype_kwargs, pil_image_processor
from ..runtime.hub import metadata_dir
from ..runtime.meta import meta_parameters
from .adapters import merge_saved_peft
from .checkpoints import (
    CheckpointTensors,
    assign_all,
    checkpoint_dir,
    default_dtype,
    open_tensors,
    refuse_quantized,
)
from .lm_families import mpt_config, mpt_from_state
from .openflamingo import convert_openflamingo, module_names, param_name

# model_type -> the markers its tokenizer adds after `<|endofchunk|>`, `<image>`, and the processor's template
FORMATS: dict[str, tuple[tuple[str, ...], str]] = {"otter": (("<answer>",), "otter"), "flamingo": ((), "flamingo")}
# The tokenizer Otter's code loads for an LM family whose config names none (the LM's `_name_or_path` otherwise)
BASE_TOKENIZERS = {"mpt": "mosaicml/mpt-7b-instruct", "mosaic_gpt": "mosaicml/mosaic-llama-redpajama-final-candidate"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_LAYER = re.compile(r"lang_encoder\.(.+)\.(\d+)\.(decoder_layer|gated_cross_attn_layer)\.(.*)$")


def read_otter(source: Union[str, os.PathLike], *, revision: Optional[str] = None
               ) -> tuple[dict[str, Any], CheckpointTensors, str]:
    """An Otter repository (hub name at `revision`, or directory) -> (config dict, tensors, local directory). Its
    config is fetched and checked first (Otter's, not quantized): the weights are downloaded only for an Otter. They
    are read from safetensors, or `.bin` files weights-only (no pickle code runs)."""
    refuse_quantized(otter_config(metadata_dir(str(source), "Otter model", revision=revision), str(source)),
                     str(source))
    directory = checkpoint_dir(str(source), "Otter model", revision=revision)
    config = otter_config(directory, str(source))
    return config, open_tensors(directory), directory


def otter_config(directory: str, source: str) -> dict[str, Any]:
    """The `config.json` of an Otter repository (its local `directory`), checked to be Otter's."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json in {directory!r}: not a transformers save_pretrained directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path!r} is not valid JSON (truncated?): {e}") from e
    if not isinstance(config, dict) or config.get("model_type") not in FORMATS:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ValueError(f"{source}: model_type {found!r} is not Otter's (`otter`) or its "
                         "OpenFlamingo format's (`flamingo`)")
    for part in ("vision_config", "text_config"):
        if not isinstance(config.get(part), dict):
            raise ValueError(f"{source}: config.json has no {part}")
    return config


def split_otter_state(names: Iterable[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Otter's tensor names -> where each goes, as {new name: Otter's name}: the vision tower's, the LM's, and the
    OpenFlamingo names of the perceiver and the blocks (for `convert_openflamingo`). Reads no tensor."""
    names = list(names)
    if any("lora_" in key for key in names):
        raise ValueError("this Otter checkpoint holds LoRA adapters but its config has no `lora_config` (their "
                         "alpha): merge them into the LM first (peft's merge_and_unload)")
    vision: dict[str, str] = {}
    lm: dict[str, str] = {}
    of: dict[str, str] = {}
    unknown = []
    for key in names:
        if key.startswith("vision_encoder."):
            vision[key[len("vision_encoder."):]] = key
        elif key.startswith("perceiver."):
            m = re.match(r"perceiver\.layers\.(\d+)\.(feed_forward\.)?(.*)$", key)
            name = key
            if m:  # OpenFlamingo: `.0` the attention, `.1` the feed-forward
                name = f"perceiver.layers.{m.group(1)}.{'1' if m.group(2) else '0'}.{m.group(3)}"
            of[name] = key
        elif key.startswith("lang_encoder."):
            m = _LAYER.match(key)
            if m and m.group(3) == "gated_cross_attn_layer":
                rest = re.sub(r"^feed_forward\.", "ff.", m.group(4))
                of[f"lang_encoder.gated_cross_attn_layers.{m.group(2)}.{rest}"] = key
                continue
            lm[f"{m.group(1)}.{m.group(2)}.{m.group(4)}" if m else key[len("lang_encoder."):]] = key
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"tensors outside Otter's vision_encoder / lang_encoder / perceiver: {unknown[:5]}")
    if not vision or not lm:
        raise ValueError("the checkpoint lacks the vision tower (vision_encoder.*) or the LM (lang_encoder.*)")
    return vision, lm, of


def otter_key(of_key: str, layers_path: str) -> str:
    """An OpenFlamingo name of the resampler or a block -> Otter's (`split_otter_state` read backwards); `layers_path`
    is where Otter's LM keeps its wrapped layers (`model.layers`, `transformer.blocks`)."""
    m = re.match(r"perceiver\.layers\.(\d+)\.([01])\.(.*)$", of_key)
    if m:
        return f"perceiver.layers.{m.group(1)}.{'feed_forward.' if m.group(2) == '1' else ''}{m.group(3)}"
    m = re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.*)$", of_key)
    if m:
        rest = re.sub(r"^ff\.", "feed_forward.", m.group(2))
        return f"lang_encoder.{layers_path}.{m.group(1)}.gated_cross_attn_layer.{rest}"
    return of_key


def check_otter_trained(of: dict[str, str]) -> None:
    """Every tensor of the resampler and of each block present (`split_otter_state`'s OpenFlamingo names -> Otter's):
    a damaged file's missing tensor is named as the Otter file names it, before `convert_openflamingo` would name
    OpenFlamingo's key. A block missing whole is `convert_openflamingo`'s (the layers it expects)."""
    if "perceiver.latents" not in of:
        raise ValueError("the Otter checkpoint lacks 'perceiver.latents'")
    depth = 1 + max((int(m.group(1)) for k in of if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))), default=0)
    layers = sorted({int(m.group(1)) for k in of
                     if (m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", k))})
    if not layers:
        raise ValueError("the Otter checkpoint has no gated cross-attention layers "
                         "(`lang_encoder.<layers>.{L}.gated_cross_attn_layer.*`)")
    block = next(v for k, v in of.items() if k.startswith("lang_encoder."))
    layers_path = _LAYER.match(block).group(1)
    missing = [name for name, _ in module_names(depth, layers) if name not in of]
    if missing:
        raise ValueError(f"the Otter checkpoint lacks {otter_key(missing[0], layers_path)!r}")


def otter_vision(vision_config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """The checkpoint's CLIP tower, its tensors becoming its parameters; every tensor must find its parameter and
    back."""
    config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
    with meta_parameters():
        model = CLIPVisionModel(config).to(dtype)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer in older transformers
    assign_all(model, state, "Otter's vision tower")
    return unnamed(model).eval()


def otter_lm(text_config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype) -> PreTrainedModel:
    """The checkpoint's LM on a class transformers ships (or our MosaicGPT), its tensors becoming its parameters."""
    kwargs = dtype_kwargs(dtype)
    if text_config.get("model_type") == "mpt":
        return unnamed(mpt_from_state(text_config, state, **kwargs))
    config = otter_lm_config(text_config)
    with meta_parameters():
        if isinstance(config, MosaicGPTConfig):
            register()
            model: PreTrainedModel = MosaicGPTForCausalLM(config).to(dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    assign_all(model, state, "Otter's LM")
    return unnamed(model).eval()  # its table is Otter's, not the base model's: saved whole


def unnamed(model: PreTrainedModel) -> PreTrainedModel:
    """`model` referring to no name: a backbone built from an Otter checkpoint's tensors is saved whole. Its config's
    `_name_or_path`, copied from the checkpoint's `text_config` / `vision_config`, names the base model Otter started
    from (a LLaMA, CLIP); `name_or_path_of` would read it, and a trained-only save would reload that base model's
    weights in place of Otter's."""
    model.name_or_path = ""
    model.config._name_or_path = ""
    return model


def otter_lm_config(text_config: dict[str, Any]) -> PretrainedConfig:
    """The config of the LM `otter_lm` builds from the checkpoint's `text_config`."""
    model_type = text_config.get("model_type")
    if model_type == "mpt":
        return mpt_config(text_config)
    fields = {k: v for k, v in text_config.items() if k != "model_type"}
    if model_type == "mosaic_gpt":
        return MosaicGPTConfig(**fields)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as e:
        raise ValueError(f"Otter's LM is a {model_type!r}, which transformers does not know: {e}") from e


def _embedding_rows(lm: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The LM's input table and output head under OpenFlamingo's names: `convert_openflamingo` takes the added
    tokens' rows from them. They are the LM's own tensors, read from the checkpoint: no second copy."""
    rows = {}
    for module in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        if module is not None:
            rows["lang_encoder." + param_name(lm, module.weight)] = module.weight.detach()
    return rows


TokenizerArg = Union[None, str, os.PathLike, PreTrainedTokenizerBase]


def otter_tokenizer(directory: str, text_config: dict[str, Any], tokenizer: TokenizerArg = None
                    ) -> PreTrainedTokenizerBase:
    """`tokenizer` (object, name or directory), else the repository's own, else the base one Otter's code loads."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = tokenizer
    if source is None and any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        source = directory
    if source is None:
        source = BASE_TOKENIZERS.get(text_config.get("model_type")) or text_config.get("_name_or_path")
    if not source:
        raise ValueError("the Otter checkpoint names no tokenizer: pass tokenizer= (--tokenizer), its base LM's")
    return load_tokenizer(source)


def otter_image_processor(config: dict[str, Any], directory: str) -> Any:
    """The repository's `preprocessor_config.json`, else `CLIPImageProcessor()` at the tower's size (what Otter's demos
    use)."""
    if os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
        return load_image_processor(directory)
    size = int(config["vision_config"].get("image_size", 224))
    return pil_image_processor("CLIPImageProcessor")(size={"shortest_edge": size},
                                                     crop_size={"height": size, "width": size})


def otter_processor_kwargs(config: dict[str, Any], directory: str, tokenizer: TokenizerArg = None,
                           image_processor: Any = None) -> dict[str, Any]:
    """The processor's parts, as `convert_openflamingo` and `flamingo_processor` take them: `tokenizer`
    (`otter_tokenizer`), `image_processor` (`otter_image_processor` unless given), the format's `extra_tokens` and
    `template` (`FORMATS`)."""
    extra_tokens, template = FORMATS[config["model_type"]]
    return {"tokenizer": otter_tokenizer(directory, config["text_config"], tokenizer),
            "image_processor": image_processor if image_processor is not None
            else otter_image_processor(config, directory),
            "extra_tokens": extra_tokens, "template": template}


def otter_max_frames(config: dict[str, Any]) -> int:
    """The converted model's `max_frames`: Otter builds `max_num_frames` frame embeddings when its config sets it (its
    OpenFlamingo format never does); without them, `infer_config`'s default."""
    frames = config.get("max_num_frames") if config["model_type"] == "otter" else None
    return int(frames) if frames is not None else FlamingoConfig().max_frames


def otter_processor_of(source: Union[str, os.PathLike], *, revision: Optional[str] = None) -> FlamingoProcessor:
    """The processor `from_otter(source)` gives, from the repository's configs and tokenizer files alone: no weights
    are fetched or read."""
    directory = metadata_dir(str(source), "Otter model", revision=revision)
    config = otter_config(directory, str(source))
    processor, _ = flamingo_processor(**otter_processor_kwargs(config, directory), max_frames=otter_max_frames(config),
                                      max_positions=config_max_positions(otter_lm_config(config["text_config"])))
    return processor


def from_otter(source: Union[str, os.PathLike], tokenizer: TokenizerArg = None, *, revision: Optional[str] = None,
               image_processor: Any = None, torch_dtype: Optional[torch.dtype] = None
               ) -> tuple[Flamingo, FlamingoProcessor]:
    """Our model + processor computing what an Otter checkpoint (hub name or directory) computes.

    tokenizer: the repository's or its base LM's unless given (module docstring). image_processor: the repository's
    `preprocessor_config.json`, else `CLIPImageProcessor()` at the tower's size (what Otter's demos use).
    torch_dtype defaults to the checkpoint's. The backbones are saved whole (`save_pretrained`), or once with
    `convert.write_backbones` for trained-only checkpoints."""
    config, tensors, directory = read_otter(source, revision=revision)
    if "lora_config" in config:  # its LM saved under PEFT's LoRA (Otter's converting_otter_to_lora.py): merged
        tensors = merge_saved_peft(tensors, float(config["lora_config"]["lora_alpha"]))
    vision_names, lm_names, of_names = split_otter_state(tensors)
    check_otter_trained(of_names)
    dtype = torch_dtype or next(d for d in map(tensors.dtype_of, lm_names.values()) if d.is_floating_point)
    tensors = tensors.cast(dtype)
    parts = otter_processor_kwargs(config, directory, tokenizer, image_processor)
    vision = otter_vision(config["vision_config"], {k: tensors[v] for k, v in vision_names.items()}, dtype)
    lm = otter_lm(config["text_config"], {k: tensors[v] for k, v in lm_names.items()}, dtype)
    of_state = {**{k: tensors[v] for k, v in of_names.items()}, **_embedding_rows(lm)}
    with default_dtype(dtype):  # the perceiver and blocks: in `dtype` (never float32), the checkpoint's own tensors
        model, processor = convert_openflamingo(of_state, vision, lm, **parts, take_tensors=True,
                                                padded_table=True)  # the LM's own table
    del of_state
    every = config.get("cross_attn_every_n_layers")
    if every is not None and model.config.xattn_every != every:
        raise ValueError(f"the checkpoint's blocks sit every {model.config.xattn_every} layers, its config says "
                         f"{every}")
    if model.config.max_frames != otter_max_frames(config):  # `otter_processor_of` reads them from the config
        raise ValueError(f"the checkpoint's frame embeddings make max_frames {model.config.max_frames}, its config "
                         f"{otter_max_frames(config)} (max_num_frames)")
    return to_dtype(model, dtype).eval(), processor
