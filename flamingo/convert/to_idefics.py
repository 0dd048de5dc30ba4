"""Our model -> a transformers `IdeficsForVisionText2Text` directory, the inverse of `from_idefics`: a model
converted from IDEFICS and trained here (or any model of that shape) runs in transformers' IDEFICS and the servers
built on it, computing our logits.

What is written (`save_idefics`), by `save_pretrained`s, atomically:
- `config.json`: an `IdeficsConfig` read off our model: the Llama LM's sizes, norm epsilon, rotary settings,
  positions and bos/eos ids; `vocab_size` = our first added token and `additional_vocab_size` = the rows after it;
  `cross_layer_interval` k from our blocks' placement (before layers 0, k, 2k, ...), `qk_layer_norms`, `alpha_type`
  (our scalar / vector gates -> "float" / "vector"), the tower as `vision_config`, the resampler as
  `perceiver_config`. `generation_config.json`: our `generate`'s defaults (stop at EOS or the end of a turn, never
  emit `<image>`, greedy).
- the weights under IDEFICS's names (`idefics_state`): the tower as `model.vision_model.*`, the Llama layers and
  norm as they are, the LM's rows below the first added token as `embed_tokens` / `lm_head` and our added-token rows
  (with any LM rows after them) as the decoupled `additional_embedding` / `additional_fc`, the resampler as
  `model.perceiver_resampler.*` (our fused k/v projections split), the blocks as `model.gated_cross_attn_layers.{j}`
  with their gates as alphas. One dtype for all (IDEFICS has one): the LM's unless asked.
- the tokenizer and an `IdeficsImageProcessor` with our image processor's size, mean and std (`IdeficsProcessor`
  loads them).
The first time embedding, which our resampler adds to every patch of a still (training moves it off the zero
`from_idefics` sets), has no IDEFICS tensor: it is folded into the bias of the tower's last MLP projection, which
adds the same vector to every position of the tower's last hidden state, all the perceiver reads.

What IDEFICS cannot compute is refused with every reason at once (`incompatibilities`).
Known difference: IDEFICS's processor cuts a token's image at a `</s>` that follows it (convert/idefics.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from transformers import CLIPVisionModel, IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor, LlamaForCausalLM

from ..config import IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN
from ..model.flamingo import Flamingo
from ..model.generation import generation_config_for
from ..model.lora import has_lora
from ..model.quantize import quantized_mode
from ..processing import FlamingoProcessor
from ..runtime.checkpoint_io import atomic_directory, check_replaceable
from ..runtime.compat import idefics_rope_kwargs, idefics_rope_problem, pil_image_processor
from ..runtime.meta import meta_parameters
from .checkpoints import meta_tensors
from .idefics import idefics_names

IdeficsImageProcessor = pil_image_processor("IdeficsImageProcessor")

BICUBIC = 3  # PIL's resampling id: IDEFICS's image processor resizes with it


def _cross_layer_interval(model: Flamingo) -> Optional[int]:
    """k when our blocks sit before layers 0, k, 2k, ... of an LM of a multiple of k layers (IDEFICS's
    `idx % cross_layer_interval == 0`, one block per k layers); None otherwise."""
    layers = len(model.lm.get_submodule(model.decoder_layers_path))
    indices = model.xattn_layer_indices
    k = indices[1] if len(indices) > 1 else layers
    if k < 1 or layers % k or indices != list(range(0, layers, k)):
        return None
    return k


def _size(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _image_processing_differences(image_processor: Any, image_size: int) -> list[str]:
    """How `image_processor` differs from IDEFICS's: a square resize to the tower's size, bicubic, no crop, /255,
    then normalised (empty: it computes the same pixels)."""
    ip, found = image_processor, []
    size = getattr(ip, "size", None)
    if not getattr(ip, "do_resize", False) or size is None or \
            (_size(size, "height"), _size(size, "width")) != (image_size, image_size):
        found.append(f"not a resize to {image_size}x{image_size}")
    if getattr(ip, "resample", None) is None or int(ip.resample) != BICUBIC:
        found.append("not bicubic")
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and (crop is None or (_size(crop, "height"), _size(crop, "width"))
                                                  != (image_size, image_size)):
        found.append("a centre crop")
    if not getattr(ip, "do_rescale", False) or abs(float(getattr(ip, "rescale_factor", 0.0)) - 1 / 255) > 1e-12:
        found.append("not scaled by 1/255")
    if not getattr(ip, "do_normalize", False) or getattr(ip, "image_mean", None) is None:
        found.append("not normalised")
    return found


def incompatibilities(model: Flamingo, processor: Optional[FlamingoProcessor] = None) -> list[str]:
    """What transformers' IDEFICS cannot compute of this model (and, given, its processor); empty: it exports
    exactly."""
    c = model.config
    found = []
    if c.block != "idefics":
        found.append(f"{c.block!r} cross-attention blocks (IDEFICS's are RMSNorm'd with a gated SiLU MLP)")
    if not c.gated:
        found.append("ungated blocks (IDEFICS always scales by tanh(alpha))")
    if _cross_layer_interval(model) is None:
        found.append(f"blocks before layers {model.xattn_layer_indices}, not before layers 0, k, 2k, ... of an LM "
                     "of a multiple of k layers (idx % cross_layer_interval == 0)")
    if not c.only_attend_last_image:
        found.append("attention to every earlier image (IDEFICS's tokens see the last one)")
    if c.attend_next_image:
        found.append("OpenFlamingo v1's rule (attend_next_image: text sees the next image)")
    if c.imageless_rows_skip_blocks:
        found.append("imageless_rows_skip_blocks (IDEFICS runs the blocks' MLPs on rows without images)")
    if c.num_image_references:
        found.append("image reference tokens")
    if c.resampler != "perceiver" or c.resampler_ffw_act != "relu" or c.ffw_mult != 4:
        found.append("a resampler other than IDEFICS's perceiver (ReLU MLP of 4x the tower's width)")
    if c.max_frames != 1:
        found.append(f"video (max_frames={c.max_frames}; IDEFICS reads one frame per image)")
    if c.vision_feature_layer != -1 or c.drop_cls_token:
        found.append("vision features other than the tower's whole last hidden state (CLS token included)")
    if c.lm_lora is not None or has_lora(model.lm):
        found.append("LoRA adapters on the LM (merge them first: model.merge_lora())")
    stored = quantized_mode(model)
    if stored != "none":
        found.append(f"quantized backbones ({stored}): export the model loaded unquantized")
    if not isinstance(model.vision, CLIPVisionModel):
        found.append(f"a {type(model.vision).__name__} vision tower (IDEFICS's is CLIP-shaped: CLIPVisionModel)")
    if not isinstance(model.lm, LlamaForCausalLM):
        found.append(f"a {type(model.lm).__name__} LM (IDEFICS's is Llama-shaped: LlamaForCausalLM)")
    else:
        lc = model.lm.config
        heads, dim = lc.num_attention_heads, lc.hidden_size
        if lc.num_key_value_heads != heads or dim % heads or (getattr(lc, "head_dim", None) or dim // heads) \
                != dim // heads:
            found.append("an LM attention other than IDEFICS's (as many k/v heads as heads, of hidden/heads)")
        if lc.attention_bias or getattr(lc, "mlp_bias", False) or lc.hidden_act != "silu":
            found.append("an LM with biases or a non-SiLU MLP")
        if c.block == "idefics" and (c.xattn_heads, c.xattn_head_dim) != (heads, dim // heads):
            found.append(f"block attention of {c.xattn_heads} heads of {c.xattn_head_dim}, not the LM's {heads} of "
                         f"{dim // heads}")
        if c.block == "idefics" and c.xattn_ffw_dim != lc.intermediate_size:
            found.append(f"a block MLP of {c.xattn_ffw_dim}, not the LM's intermediate size {lc.intermediate_size}")
        if c.block == "idefics" and c.xattn_norm_eps != lc.rms_norm_eps:
            found.append(f"block norm epsilon {c.xattn_norm_eps}, not the LM's {lc.rms_norm_eps}")
        rope = idefics_rope_problem(lc)
        if rope:
            found.append(rope)
        rows = model.lm.get_input_embeddings().num_embeddings
        head = model.lm.get_output_embeddings()
        if head is None or head.weight.shape[0] != rows or getattr(head, "bias", None) is not None:
            found.append("an output head other than one bias-free row per input row")
    if processor is not None:
        if processor.template != "idefics":
            found.append(f"the {processor.template!r} prompt template (IdeficsProcessor writes IDEFICS's prompts: "
                         f"{IDEFICS_IMAGE_WRAPPER} around each image)")
        elif processor.tokenizer.convert_tokens_to_ids(MEDIA_TOKEN) != c.media_token_id:
            found.append(f"a tokenizer whose {MEDIA_TOKEN} is not the model's media token")
        if isinstance(model.vision, CLIPVisionModel):
            image_size = model.vision.config.image_size
            differences = _image_processing_differences(processor.image_processor, image_size)
            if differences:
                found.append("image preprocessing other than IDEFICS's (" + ", ".join(differences) + ")")
    return found


def idefics_config(model: Flamingo, processor: FlamingoProcessor) -> IdeficsConfig:
    """The `IdeficsConfig` our (exportable) model implies."""
    c, lc, vc = model.config, model.lm.config, model.vision.config
    rows = model.lm.get_input_embeddings().num_embeddings
    first = c.first_new_token_id if c.num_new_tokens else rows  # our rows from here on: IDEFICS's additional ones
    pad = processor.tokenizer.pad_token_id
    rope = idefics_rope_kwargs(lc)  # the converter's mapping: the same keyword on IdeficsConfig
    return IdeficsConfig(
        vocab_size=first, additional_vocab_size=rows - first, hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size, num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads, hidden_act=lc.hidden_act, rms_norm_eps=lc.rms_norm_eps,
        max_position_embeddings=lc.max_position_embeddings, **rope,
        alpha_type="vector" if c.gate_type == "vector" else "float", cross_layer_interval=_cross_layer_interval(model),
        qk_layer_norms=c.xattn_qk_norm, use_resampler=True, tie_word_embeddings=False,
        pad_token_id=pad if pad is not None and pad < first else None,  # IDEFICS's padding row is a base row
        bos_token_id=lc.bos_token_id, eos_token_id=lc.eos_token_id,
        freeze_text_layers=c.freeze_lm, freeze_lm_head=c.freeze_lm, freeze_vision_layers=c.freeze_vision,
        vision_config=dict(embed_dim=vc.hidden_size, image_size=vc.image_size, intermediate_size=vc.intermediate_size,
                           patch_size=vc.patch_size, num_hidden_layers=vc.num_hidden_layers,
                           num_attention_heads=vc.num_attention_heads, num_channels=vc.num_channels,
                           hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=c.num_latents, resampler_depth=c.resampler_depth,
                              resampler_n_heads=c.resampler_heads, resampler_head_dim=c.resampler_head_dim,
                              qk_layer_norms_perceiver=c.resampler_qk_norm))


def _tables(model: Flamingo) -> dict[str, torch.Tensor]:
    """The LM's input and output tables split at our first added token: base rows, then ours (and any LM rows after
    them) as IDEFICS's decoupled rows."""
    c = model.config
    table = model.lm.get_input_embeddings().weight.detach()
    head = model.lm.get_output_embeddings().weight.detach()
    if not c.num_new_tokens:
        return {"model.embed_tokens.weight": table, "lm_head.weight": head}
    first, end = c.first_new_token_id, c.first_new_token_id + c.num_new_tokens
    ours_in = model.new_token_embeddings.detach()
    ours_out = model.new_lm_head.detach() if model.new_lm_head is not None else ours_in  # a tied head reads the input
    return {"model.embed_tokens.weight": table[:first],
            "model.embed_tokens.additional_embedding.weight": torch.cat([ours_in.to(table.dtype), table[end:]]),
            "lm_head.weight": head[:first],
            "lm_head.additional_fc.weight": torch.cat([ours_out.to(head.dtype), head[end:]])}


def _trained_state(model: Flamingo) -> dict[str, torch.Tensor]:
    """The resampler and the blocks under IDEFICS's names (`from_idefics`'s mapping, `idefics_names`, inverted)."""
    c, ours = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    blocks = len(model.xattn_layer_indices)
    out: dict[str, torch.Tensor] = {}
    for theirs, name in idefics_names(c.resampler_depth, c.resampler_qk_norm, blocks, c.xattn_qk_norm):
        parts = ours[name].chunk(len(theirs))  # the fused (k, v) split
        out.update(zip(theirs, parts))
    gate_shape = (1, 1, -1) if c.gate_type == "vector" else (1,)  # IDEFICS's alphas: (1, 1, D) or (1,)
    for j in range(blocks):
        src, dst = f"xattn.{j}.", f"model.gated_cross_attn_layers.{j}."
        out[f"{dst}alpha_cross_attn"] = ours[f"{src}attn_gate"].reshape(gate_shape)
        out[f"{dst}alpha_dense"] = ours[f"{src}ffw_gate"].reshape(gate_shape)
    return out


def _vision_state(model: Flamingo) -> dict[str, torch.Tensor]:
    """The tower under IDEFICS's names, the resampler's first time embedding folded into its last MLP bias."""
    state = {"model.vision_model." + k.removeprefix("vision_model."): v.detach()
             for k, v in model.vision.state_dict().items()}  # transformers 4 nests the tower in `vision_model.`
    time = model.resampler.time_embeddings.detach()[0]  # (Dv,): added to every patch of a still
    last = f"model.vision_model.encoder.layers.{model.vision.config.num_hidden_layers - 1}.mlp.fc2.bias"
    bias = state[last]
    state[last] = (bias.float() + time.float().to(bias.device)).to(bias.dtype)
    return state


def idefics_state(model: Flamingo, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Every tensor of the `IdeficsForVisionText2Text` computing our model, under its names, on the CPU in `dtype`
    (default: the LM's); none shares memory with another. Raises ValueError listing what IDEFICS cannot compute."""
    problems = incompatibilities(model)
    if problems:
        raise ValueError("IDEFICS cannot represent this model: " + "; ".join(problems))
    dtype = dtype or model.lm.get_input_embeddings().weight.dtype
    lm = {k: v.detach() for k, v in model.lm.state_dict().items() if k.startswith(("model.layers.", "model.norm."))}
    state = {**_vision_state(model), **lm, **_tables(model), **_trained_state(model)}
    return {k: _owned(v, dtype) for k, v in state.items()}


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` on the CPU in `dtype`, copied when it is a view (a split or a slice): a parameter of ours is taken as it
    is, no second copy of a large model."""
    out = t.to(device="cpu", dtype=dtype)
    return out.clone() if out is t and t._base is not None else out.contiguous()


def _idefics_model(config: IdeficsConfig, state: dict[str, torch.Tensor]) -> IdeficsForVisionText2Text:
    """An IDEFICS model holding exactly `state`: built without memory for its parameters, then each one assigned; a
    tensor it lacks, one it does not have or one of another shape is an error."""
    with meta_parameters():
        idefics = IdeficsForVisionText2Text(config)
    try:
        result = idefics.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of another shape
        raise ValueError(f"the export does not fit IdeficsForVisionText2Text: {e}") from e
    unset = meta_tensors(idefics)
    if result.missing_keys or result.unexpected_keys or unset:
        raise ValueError(f"the export does not fit IdeficsForVisionText2Text: no value for "
                         f"{(result.missing_keys or unset)[:5]}, no place for {result.unexpected_keys[:5]}")
    return idefics.eval()


def _write_processor(processor: FlamingoProcessor, image_size: int, directory: str) -> None:
    """The tokenizer and IDEFICS's image processor with our normalisation, as `IdeficsProcessor` saves them, and
    the image processor's own `preprocessor_config.json` (what `AutoImageProcessor`, transformers 4's
    `IdeficsProcessor` and `from_idefics` read)."""
    ip = processor.image_processor
    image_processor = IdeficsImageProcessor(image_size=image_size, image_mean=list(ip.image_mean),
                                            image_std=list(ip.image_std))
    try:
        IdeficsProcessor(image_processor, processor.tokenizer).save_pretrained(directory)
    except (TypeError, ValueError):  # transformers 4's IdeficsProcessor takes Llama tokenizers only
        processor.tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)


# Written into every export beside IDEFICS's own files: it tells an earlier export (replaced whole by the next) from
# any other directory, a downloaded IDEFICS included (transformers ignores the file).
EXPORT_MARKER = "flamingo_export.json"


def check_idefics_out(directory: str) -> None:
    """Refuse an export directory that holds files and is not an earlier export of this project (`EXPORT_MARKER`):
    `save_idefics` replaces it whole."""
    check_replaceable(directory, EXPORT_MARKER, "an earlier IDEFICS export of flamingo")


def save_idefics(model: Flamingo, processor: FlamingoProcessor, directory: str, *,
                 torch_dtype: Optional[torch.dtype] = None) -> IdeficsConfig:
    """Write our model as an `IdeficsForVisionText2Text` directory (`from_pretrained` loads it; module docstring)
    with its tokenizer and image processor, atomically: `directory` is new, empty or an earlier export
    (`check_idefics_out`), replaced whole. Raises ValueError listing what IDEFICS cannot compute
    (the directory is then left as it was). Returns the config written."""
    check_idefics_out(directory)
    problems = incompatibilities(model, processor)
    if problems:
        raise ValueError("IDEFICS cannot represent this model: " + "; ".join(problems))
    config = idefics_config(model, processor)
    state = idefics_state(model, torch_dtype)
    idefics = _idefics_model(config, state)
    idefics.generation_config = generation_config_for(model)
    # min_p 0 (a neutral filter where the LM ships one) is refused by a greedy config's strict save; the exported
    # model's own config is the one transformers would fill a None from, so None is neutral there
    idefics.generation_config.min_p = None
    with atomic_directory(directory, EXPORT_MARKER, "an earlier IDEFICS export of flamingo") as tmp:
        idefics.save_pretrained(tmp)
        _write_processor(processor, config.vision_config.image_size, tmp)
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
            json.dump({"format": "idefics", "written_by": "flamingo export idefics"}, f)
    return config
