"""Hugging Face's IDEFICS (`IdeficsForVisionText2Text`) -> our model, computing the same function.

What goes where (DESIGN §10; transformers' `models/idefics/`):
- `model.vision_model.*` (a CLIP-shaped ViT of IDEFICS's own class) -> `CLIPVisionModel`, key for key; its image
  processor (resize to a square, bicubic, CLIP's mean/std) -> `CLIPImageProcessorPil` with the same settings.
- `model.layers.*`, `model.norm`, `model.embed_tokens.weight`, `lm_head.weight` (a Llama copy) -> `LlamaForCausalLM`
  with the same rotary and norm settings. The decoupled rows (`embed_tokens.additional_embedding`,
  `lm_head.additional_fc`: `<fake_token_around_image>`, `<image>`) become the LM's rows [V, V + A) and our added-token
  rows (`new_token_embeddings`, `new_lm_head`), the only trainable vocabulary rows, as IDEFICS trains them.
- `model.perceiver_resampler.*` -> our `PerceiverResampler` (ReLU FFW, optional q/k LayerNorms, no time embeddings:
  they are set to zero, one frame), fed the tower's whole output (CLS included: `drop_cls_token=False`).
- `model.gated_cross_attn_layers.{j}` -> the `block: idefics` variant before LM layer j·k
  (`idx % cross_layer_interval == 0`), with its q/k RMSNorms and float or vector alphas (our scalar/vector gates).
- The prompt format -> the processor's `idefics` template (`processing.idefics_prompt`).
Known difference: IDEFICS's processor also cuts a token's image at a `</s>` that follows it (its packed-document
rule); our masking rule does not, so prompts with `</s>` after an image differ there (none of its prompt formats has
one). Checkpoints are read from safetensors (no pickle).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    IdeficsConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
)

from ..config import END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN, FlamingoConfig
from ..model.cast import to_dtype
from ..model.flamingo import Flamingo
from ..processing import FlamingoProcessor, load_image_processor, load_tokenizer
from ..runtime.compat import dtype_kwargs, idefics_rope_kwargs, pil_image_processor
from ..runtime.hub import metadata_dir
from ..runtime.meta import meta_parameters
from .adapters import ADAPTER_CONFIG, LoraAdapter, is_adapter_dir, read_adapter_config, read_lora_adapter
from .checkpoints import CheckpointTensors, assign_all, checkpoint_dir, open_tensors, refuse_quantized

CLIPImageProcessor = pil_image_processor("CLIPImageProcessor")

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
IDEFICS_MEAN = [0.48145466, 0.4578275, 0.40821073]
IDEFICS_STD = [0.26862954, 0.26130258, 0.27577711]


def read_idefics(source: Union[str, os.PathLike, nn.Module], revision: Optional[str] = None
                 ) -> tuple[IdeficsConfig, CheckpointTensors, Optional[str]]:
    """(config, tensors, local directory or None) of an IDEFICS model object, directory or hub name (at `revision`).
    An object's tensors are copied as they are read: the converted model shares nothing with it. A hub name's config
    is fetched and checked first (`checked_idefics_config`): its weights are downloaded only for an IDEFICS."""
    if isinstance(source, nn.Module):
        if not isinstance(getattr(source, "config", None), IdeficsConfig):
            raise ValueError(f"not an IDEFICS model: {type(source).__name__}")
        return source.config, CheckpointTensors.of_dict(source.state_dict(), copy=True), None
    checked_idefics_config(str(source), revision)
    path = checkpoint_dir(str(source), "IDEFICS model", revision=revision, allow_bin=False)
    config = read_idefics_config(path)
    return config, open_tensors(path, allow_bin=False), path


def checked_idefics_config(source: str, revision: Optional[str] = None) -> IdeficsConfig:
    """The config of the IDEFICS `source` (directory, or hub name at `revision`: its configs alone fetched), refused
    when it is another model's or saved quantized: before any weights are downloaded."""
    config = read_idefics_config(metadata_dir(source, "IDEFICS model", revision=revision))
    refuse_quantized(config.to_dict(), source)
    return config


def read_idefics_config(directory: str) -> IdeficsConfig:
    """The `IdeficsConfig` saved in `directory`, or a ValueError naming its `config.json` (missing, unreadable, or
    another model's: transformers would fill in defaults or raise an OSError)."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except FileNotFoundError as e:
        raise ValueError(f"no config.json in {directory!r}: not an IDEFICS model directory") from e
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path!r} is not a JSON config object (truncated?): {e}") from e
    if model_type != "idefics":
        raise ValueError(f"{path!r} describes a {model_type!r} model, not IDEFICS (model_type 'idefics')")
    return IdeficsConfig.from_pretrained(directory)


def idefics_flamingo_config(config: IdeficsConfig) -> FlamingoConfig:
    """Our config for an IDEFICS one: its block variant and placement, its perceiver's shape and options."""
    if not config.use_resampler:
        raise ValueError("IDEFICS without its perceiver (use_resampler=False) is not supported: every published "
                         "IDEFICS checkpoint uses it")
    if config.alpha_type not in ("float", "vector"):
        raise ValueError(f"unknown IDEFICS alpha_type {config.alpha_type!r}")
    layers, every = config.num_hidden_layers, config.cross_layer_interval
    if layers % every:
        raise ValueError(f"num_hidden_layers={layers} is not a multiple of cross_layer_interval={every}: IDEFICS "
                         "itself cannot run this config")
    perceiver = config.perceiver_config
    return FlamingoConfig(
        block="idefics", xattn_layers=list(range(0, layers, every)), xattn_every=every,
        xattn_heads=config.num_attention_heads, xattn_head_dim=config.hidden_size // config.num_attention_heads,
        xattn_ffw_dim=config.intermediate_size, xattn_norm_eps=config.rms_norm_eps, xattn_qk_norm=config.qk_layer_norms,
        gate_type="vector" if config.alpha_type == "vector" else "scalar", gated=True, only_attend_last_image=True,
        num_latents=perceiver.resampler_n_latents, resampler_depth=perceiver.resampler_depth,
        resampler_heads=perceiver.resampler_n_heads, resampler_head_dim=perceiver.resampler_head_dim,
        resampler_qk_norm=perceiver.qk_layer_norms_perceiver, resampler_ffw_act="relu",
        ffw_mult=4,  # the perceiver's MLP is 4x the tower's width (IdeficsPerceiverResampler.intermediate_dim)
        max_frames=1, drop_cls_token=False, vision_feature_layer=-1,
        first_new_token_id=config.vocab_size, num_new_tokens=config.additional_vocab_size)


def _vision_tower(config: IdeficsConfig, dtype: torch.dtype) -> nn.Module:
    vc = config.vision_config
    clip = CLIPVisionConfig(hidden_size=vc.embed_dim, intermediate_size=vc.intermediate_size,
                            num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
                            num_channels=vc.num_channels, image_size=vc.image_size, patch_size=vc.patch_size,
                            hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps)
    return CLIPVisionModel._from_config(clip, **dtype_kwargs(dtype)).eval()


def _vision_state(tower: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's tensors under `Flamingo.vision`'s names."""
    prefix = "model.vision_model."
    ours = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""  # 4.x / 5.x
    return {f"vision.{ours}{k[len(prefix):]}": tensors[k] for k in tensors if k.startswith(prefix)}


def _language_model(config: IdeficsConfig, dtype: torch.dtype) -> nn.Module:
    v, a = config.vocab_size, config.additional_vocab_size
    llama = LlamaConfig(
        vocab_size=v + a, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=False, attention_bias=False, **idefics_rope_kwargs(config),
        mlp_bias=False, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id)
    return AutoModelForCausalLM.from_config(llama, **dtype_kwargs(dtype)).eval()


def _lm_state(config: IdeficsConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LM's tensors under `Flamingo.lm`'s names: the decoupled rows appended to the table and the head."""
    out = {f"lm.{k}": tensors[k] for k in tensors if k.startswith(("model.layers.", "model.norm."))}
    added = "model.embed_tokens.additional_embedding.weight"
    head_key = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    if head_key != "lm_head.weight" and not config.tie_word_embeddings:
        raise ValueError("IDEFICS checkpoint lacks lm_head.weight")
    embed, head = tensors["model.embed_tokens.weight"], tensors[head_key]
    if config.additional_vocab_size:
        embed = torch.cat([embed, tensors[added]])
        head = torch.cat([head, tensors[added_head_key(config, tensors)]])
    out["lm.model.embed_tokens.weight"], out["lm.lm_head.weight"] = embed, head
    return out


def added_head_key(config: IdeficsConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    """The tensor holding the head's rows of the added tokens: `lm_head.additional_fc.weight`, or the added input
    rows where the config ties the head to the embedding (IDEFICS's `tie_weights` ties them then, and only then)."""
    key = "lm_head.additional_fc.weight"
    if key in tensors:
        return key
    if not config.tie_word_embeddings:
        raise ValueError(f"IDEFICS checkpoint lacks {key} (its config does not tie the head to the embedding)")
    return "model.embed_tokens.additional_embedding.weight"


class _Reads(Mapping[str, torch.Tensor]):
    """Tensors that remember which names were read."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self._tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def idefics_names(resampler_depth: int, resampler_qk_norm: bool, blocks: int, xattn_qk_norm: bool
                  ) -> list[tuple[tuple[str, ...], str]]:
    """(IDEFICS's names, ours) of every resampler and block tensor but the gates: one IDEFICS tensor each, or the
    (k, v) pair our fused `to_kv` concatenates. The one mapping the converter and the exporter (to_idefics.py) read
    in opposite directions."""
    pairs: list[tuple[tuple[str, ...], str]] = []
    src = "model.perceiver_resampler."
    pairs.append(((src + "latents",), "resampler.latents"))
    pairs += [((f"{src}layer_norm.{s}",), f"resampler.norm.{s}") for s in ("weight", "bias")]
    for i in range(resampler_depth):
        attn, ffw, dst = f"{src}blocks.{i}.0.", f"{src}blocks.{i}.1.", f"resampler.layers.{i}."
        for s in ("weight", "bias"):
            pairs += [((f"{attn}context_layer_norm.{s}",), f"{dst}attn.norm_media.{s}"),
                      ((f"{attn}latents_layer_norm.{s}",), f"{dst}attn.norm_latents.{s}")]
            if resampler_qk_norm:
                pairs += [((f"{attn}q_layer_norm.{s}",), f"{dst}attn.q_norm.{s}"),
                          ((f"{attn}k_layer_norm.{s}",), f"{dst}attn.k_norm.{s}")]
            pairs.append(((f"{ffw}ln.{s}",), f"{dst}ffw.0.{s}"))
        pairs += [((f"{attn}q_proj.weight",), f"{dst}attn.to_q.weight"),
                  ((f"{attn}k_proj.weight", f"{attn}v_proj.weight"), f"{dst}attn.to_kv.weight"),
                  ((f"{attn}output_proj.weight",), f"{dst}attn.to_out.weight"),
                  ((f"{ffw}fc.weight",), f"{dst}ffw.1.weight"), ((f"{ffw}c_proj.weight",), f"{dst}ffw.3.weight")]
    for j in range(blocks):
        src, dst = f"model.gated_cross_attn_layers.{j}.", f"xattn.{j}."
        pairs += [((f"{src}input_layernorm.weight",), f"{dst}attn.norm.weight"),
                  ((f"{src}cross_attn.q_proj.weight",), f"{dst}attn.to_q.weight"),
                  ((f"{src}cross_attn.k_proj.weight", f"{src}cross_attn.v_proj.weight"), f"{dst}attn.to_kv.weight"),
                  ((f"{src}cross_attn.o_proj.weight",), f"{dst}attn.to_out.weight")]
        if xattn_qk_norm:
            pairs += [((f"{src}cross_attn.q_layer_norm.weight",), f"{dst}attn.q_norm.weight"),
                      ((f"{src}cross_attn.k_layer_norm.weight",), f"{dst}attn.k_norm.weight")]
        pairs.append(((f"{src}post_attention_layernorm.weight",), f"{dst}ffw.norm.weight"))
        pairs += [((f"{src}mlp.{name}.weight",), f"{dst}ffw.{name}.weight")
                  for name in ("gate_proj", "up_proj", "down_proj")]
    return pairs


def _trained_state(config: IdeficsConfig, flamingo: FlamingoConfig, source: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The perceiver, the gated cross-attention layers and the added token rows under our names; a tensor of theirs
    left unread is an error (a part the converter would drop)."""
    state = _Reads(source)
    blocks = len(flamingo.xattn_layers or [])
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in idefics_names(flamingo.resampler_depth, flamingo.resampler_qk_norm, blocks,
                                      flamingo.xattn_qk_norm):
        out[ours] = state[theirs[0]] if len(theirs) == 1 else torch.cat([state[name] for name in theirs])
    latents = out["resampler.latents"]
    out["resampler.time_embeddings"] = torch.zeros(1, latents.shape[1], dtype=latents.dtype)
    for j in range(blocks):
        src, dst = f"model.gated_cross_attn_layers.{j}.", f"xattn.{j}."
        out[f"{dst}attn_gate"] = state[f"{src}alpha_cross_attn"].reshape(-1)  # (1,) or (1, 1, D) -> (1,) or (D,)
        out[f"{dst}ffw_gate"] = state[f"{src}alpha_dense"].reshape(-1)
    if config.additional_vocab_size:  # the added rows, as IDEFICS's decoupled tables hold them
        added = "model.embed_tokens.additional_embedding.weight"
        out["new_token_embeddings"] = source[added]
        out["new_lm_head"] = source[added_head_key(config, source)]
    unread = [k for k in source if k.startswith(("model.perceiver_resampler.", "model.gated_cross_attn_layers."))
              and k not in state.read]
    if unread:
        raise ValueError(f"IDEFICS tensors the conversion has no place for: {unread[:5]}")
    return out


def idefics_image_processor(image_size: int, mean: Optional[list] = None, std: Optional[list] = None) -> Any:
    """IDEFICS's image preprocessing (a square resize, bicubic, no crop) as a CLIP image processor."""
    return CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                              resample=3, image_mean=mean or IDEFICS_MEAN, image_std=std or IDEFICS_STD,
                              do_convert_rgb=True)


def _image_processor_of(directory: Optional[str], image_size: int) -> Any:
    if directory and os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
        saved = load_image_processor(directory)
        size = getattr(saved, "image_size", None) or image_size
        return idefics_image_processor(int(size), list(saved.image_mean), list(saved.image_std))
    return idefics_image_processor(image_size)


def _adapter_and_base(source: Union[str, os.PathLike, nn.Module], adapter: Optional[Union[str, os.PathLike]],
                      revision: Optional[str]) -> tuple[Optional[LoraAdapter], Union[str, nn.Module], Optional[str]]:
    """(the PEFT adapter to merge or None, the base model: an object, directory or hub name, the base's revision):
    `adapter` names one (`revision`: the base's); else `source` (at `revision`) may be one, whose config names its
    base (at main). Only configs are fetched to tell which: the base's weights are `read_idefics`'s to fetch, after
    its config is checked, and the adapter's once its base is an IDEFICS."""
    if isinstance(source, nn.Module):
        lora = None if adapter is None else read_lora_adapter(checkpoint_dir(str(adapter), "PEFT adapter"))
        return lora, source, None
    if adapter is not None:  # `revision` is the base's
        checked_idefics_config(str(source), revision)
        lora = read_lora_adapter(checkpoint_dir(str(adapter), "PEFT adapter", allow_bin=True))
        warn_other_base(lora.base, str(source))
        return lora, str(source), revision
    directory = metadata_dir(str(source), "IDEFICS model", revision=revision)
    if not is_adapter_dir(directory):
        return None, str(source), revision
    base = _adapter_base(directory, str(source))
    checked_idefics_config(base)
    # an adapter's weights may be `.bin` (PEFT's format before safetensors), which the model's fetch leaves out
    return read_lora_adapter(checkpoint_dir(str(source), "PEFT adapter", revision=revision, allow_bin=True)), base, None


def warn_other_base(base: Optional[str], model: str) -> None:
    """Warn when the base an adapter's config names (`base_model_name_or_path`) is not `model`, the one it is merged
    into: an adapter of another model of the same shape merges without error and computes nonsense. The same model
    is the same name, the same real path, or a hub name and a local copy of it (a directory named as its last part,
    or its snapshot in the hub cache)."""
    if not base or base == model:
        return
    if os.path.isdir(base) and os.path.isdir(model):
        if os.path.realpath(base) == os.path.realpath(model):
            return
    elif os.path.isdir(base) or os.path.isdir(model):
        local, hub = (base, model) if os.path.isdir(base) else (model, base)
        path = os.path.realpath(local)
        if os.path.basename(path) == hub.rstrip("/").rpartition("/")[2] or f"models--{hub.replace('/', '--')}" in path:
            return
    log.warning("the adapter was trained on %r (its base_model_name_or_path) and is merged into %r: if that is not "
                "the same model, the merged weights are not the fine-tune's", base, model)


def _adapter_base(directory: str, source: str) -> str:
    """The base model a PEFT adapter's config (in `directory`) names."""
    base = read_adapter_config(os.path.join(directory, ADAPTER_CONFIG)).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{source!r} is a PEFT adapter whose config names no base model: pass the base IDEFICS as "
                         "the model and this as the adapter (--adapter)")
    return base


def idefics_processor(config: IdeficsConfig, directory: Optional[str],
                      tokenizer: Union[None, str, os.PathLike, PreTrainedTokenizerBase] = None,
                      image_processor: Any = None) -> FlamingoProcessor:
    """The processor of the IDEFICS model `config` describes (saved in `directory`, or None for an in-memory one):
    `tokenizer` (object, name or directory; default the model's), which must hold IDEFICS's image tokens within the
    model's rows, its pad token the config's when it names none; `image_processor` (default the model's preprocessing,
    `idefics_image_processor`); the `idefics` template; the LM's positions as the length limit."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        if tokenizer is None and directory is None:
            raise ValueError("pass `tokenizer`: the IDEFICS model is an in-memory object")
        source = str(tokenizer or directory)
        if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
            raise ValueError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source!r}: pass the model's "
                             "tokenizer (--tokenizer)")
        tokenizer = load_tokenizer(source)
    vocab = tokenizer.get_vocab()
    total = config.vocab_size + config.additional_vocab_size
    for token in (MEDIA_TOKEN, IDEFICS_IMAGE_WRAPPER):
        if token not in vocab or vocab[token] >= total:
            raise ValueError(f"the tokenizer has no {token} within the model's {total} embedding rows")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = config.pad_token_id
    if image_processor is None:
        image_processor = _image_processor_of(directory, config.vision_config.image_size)
    limit = int(min(config.max_position_embeddings, getattr(tokenizer, "model_max_length", None) or 10**9))  # (256.0)
    return FlamingoProcessor(tokenizer, image_processor, max_length=limit, max_frames=1, template="idefics")


def idefics_processor_of(source: Union[str, os.PathLike], *, revision: Optional[str] = None) -> FlamingoProcessor:
    """The processor `from_idefics(source)` gives (a PEFT adapter's: its base's), from configs and tokenizer files
    alone: no weights are fetched or read."""
    directory = metadata_dir(str(source), "IDEFICS model", revision=revision)
    if is_adapter_dir(directory):
        directory = metadata_dir(_adapter_base(directory, str(source)), "IDEFICS model")
    return idefics_processor(read_idefics_config(directory), directory)


def from_idefics(source: Union[str, os.PathLike, nn.Module], tokenizer: Union[None, str, PreTrainedTokenizerBase]
                 = None, *, image_processor: Any = None, torch_dtype: Optional[torch.dtype] = None,
                 adapter: Optional[Union[str, os.PathLike]] = None, revision: Optional[str] = None
                 ) -> tuple[Flamingo, FlamingoProcessor]:
    """Our model + processor computing what an `IdeficsForVisionText2Text` (object, directory or hub name) does.

    tokenizer / image_processor default to the ones saved with the model. torch_dtype defaults to the weights'.
    adapter: a PEFT LoRA adapter of it (directory or hub name; adapters.py), merged as its tensors are read; `source`
    may also be such an adapter itself, on the base its config names. revision: a hub branch, tag or commit of
    `source`. The backbones are in-memory models:
    `write_backbones` saves them for trained-only checkpoints.
    """
    lora, source, revision = _adapter_and_base(source, adapter, revision)
    config, tensors, directory = read_idefics(source, revision)
    flamingo = idefics_flamingo_config(config)
    processor = idefics_processor(config, directory, tokenizer, image_processor)
    vocab = processor.tokenizer.get_vocab()
    flamingo.media_token_id = vocab[MEDIA_TOKEN]
    if END_OF_UTTERANCE in vocab and vocab[END_OF_UTTERANCE] < config.vocab_size + config.additional_vocab_size:
        flamingo.end_of_chunk_token_id = vocab[END_OF_UTTERANCE]  # generation stops at the end of a turn
    dtype = torch_dtype or tensors.dtype_of("model.embed_tokens.weight")
    tensors = tensors.cast(dtype)
    if lora is not None:
        tensors = lora.merged(tensors)

    with meta_parameters():  # the whole model: its tensors are all in the checkpoint
        model = Flamingo(_vision_tower(config, dtype), _language_model(config, dtype), flamingo)
    to_dtype(model, dtype)  # the trained parts' (meta) parameters and the buffers, as the copy into a built model did
    reads = _Reads(tensors)
    state = {**_vision_state(model.vision, reads), **_lm_state(config, reads),
             **_trained_state(config, flamingo, reads)}
    unread = [k for k in tensors if k not in reads.read]
    if unread:  # dropped, they would change what the model computes
        raise ValueError(f"{tensors.where} holds tensors the conversion has no place for: {unread[:5]}"
                         f"{f' (and {len(unread) - 5} more)' if len(unread) > 5 else ''}")
    assign_all(model, state, "the IDEFICS checkpoint")
    if lora is not None:
        lora.check_used()
    return model.eval(), processor
