"""OpenFlamingo checkpoints (2.x, and v1: open_flamingo 0.0.x, Med-Flamingo) -> our model.

OpenFlamingo v1 has 2.x's modules and names for its trained parts; its masking differs: at inference (its
`attend_previous=False`) a text token sees the next image, none after the row's last, an `<image>` token its own.
And its `vision_encoder` is open_clip's whole CLIP (2.x keeps the `.visual` alone): a whole v1 `state_dict()` holds
the tower under `vision_encoder.visual.` and CLIP's text tower beside it (`tower_prefix`).
A v1 checkpoint converts with `attend_next_image=True` (config `attend_next_image`), so that the model computes what
v1 computed (tests/test_openflamingo_v1_equal.py, against open_flamingo 0.0.2's classes).

An OpenFlamingo `checkpoint.pt` is a state dict (possibly inside `{"model_state_dict": ...}`, possibly with DDP/FSDP
prefixes) of its trained parameters: `perceiver.*`, `lang_encoder.gated_cross_attn_layers.{layer}.*` and the LM's
input embedding (OpenFlamingo trains the whole table). It is read with `torch.load(weights_only=True)`: no pickle code
runs. The mapping, per OpenFlamingo module (`module_names` lists it; to_openflamingo.py reads it backwards):
- `perceiver.layers.{i}.0.*` (PerceiverAttention) -> `resampler.layers.{i}.attn.*`; `.1.{k}` (FeedForward) ->
  `.ffw.{k}`; `perceiver.latents`, `perceiver.norm` alike. OpenFlamingo's factory builds its resampler without
  frame embeddings, so our time embeddings are set to zero (exactly its function for stills), or to
  `perceiver.frame_embs` when the checkpoint has them.
- `lang_encoder.gated_cross_attn_layers.{L}.attn.*`, `.ff.{k}`, `.attn_gate`, `.ff_gate` -> the block before LM layer L.
- the input embedding (required: every release saves it): the added tokens' rows -> `new_token_embeddings`; if the
  base rows were fine-tuned they are written into the LM and recorded in `config.extra_saved_weights` so that
  trained-only checkpoints keep them.
- an untied output head's added rows (present when the whole model state was saved) -> `new_lm_head`, and its
  bias's added rows (Phi's head has one) -> `new_lm_head_bias`; the head's other rows must be the given LM's.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..build import flamingo_processor, from_backbones
from ..config import FlamingoConfig
from ..model.backbones import config_max_positions, find_decoder_layers
from ..model.flamingo import Flamingo, check_state_shapes
from ..processing import FlamingoProcessor
from .checkpoints import meta_tensors, state_dict_of, unreadable
from .lm_families import load_openflamingo_lm, openflamingo_lm_config

log = logging.getLogger(__name__)

# What wrappers add to a module's name: DDP's `module.` in front; FSDP's, activation checkpointing's and
# torch.compile's around any submodule (a whole name segment, in front or after a dot)
_DDP_PREFIX = "module."
_WRAPPER_SEGMENT = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
OF_HEAD_DIM = 64  # OpenFlamingo's dim_head, fixed in its code
FROZEN_LM_SAMPLES = 8  # a whole checkpoint's frozen LM tensors compared with the given LM's (check_frozen_lm)
FROZEN_VISION_SAMPLES = 8  # and its frozen tower's with the given tower's (check_frozen_vision)
HEAD_ROWS_BLOCK = 4096  # rows of an untied head compared at a time (check_head_base_rows)

CLIP_VIT_L = "openai/clip-vit-large-patch14"  # open_clip's ViT-L-14 "openai" weights, as transformers ships them
# The published OpenFlamingo 2.x checkpoints (OpenFlamingo's README): hub repository -> (vision tower, LM and its
# tokenizer) each was trained on. Each repository holds one `checkpoint.pt`; the xattn interval is read from it.
PUBLISHED: dict[str, tuple[str, str]] = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": (CLIP_VIT_L, "anas-awadalla/mpt-1b-redpajama-200b"),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": (CLIP_VIT_L, "anas-awadalla/mpt-1b-redpajama-200b-dolly"),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": (CLIP_VIT_L, "togethercomputer/RedPajama-INCITE-Base-3B-v1"),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": (CLIP_VIT_L,
                                                             "togethercomputer/RedPajama-INCITE-Instruct-3B-v1"),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": (CLIP_VIT_L, "anas-awadalla/mpt-7b"),
}

# The published v1 checkpoints: hub repository -> its file. Both sit on CLIP ViT-L/14 and LLaMA-7B (v1), whose
# weights have no canonical hub name: the user names a LLaMA-7B directory or mirror (--lm).
PUBLISHED_V1: dict[str, str] = {
    "openflamingo/OpenFlamingo-9B-deprecated": "checkpoint.pt",  # OpenFlamingo v1's 9B
    "med-flamingo/med-flamingo": "model.pt",  # Med-Flamingo, fine-tuned from it on medical papers and textbooks
}


def published_openflamingo(name: str, revision: Optional[str] = None) -> tuple[str, str, Optional[str]]:
    """A published checkpoint's (local checkpoint file, vision tower, LM or None where the user must name it): the
    file is downloaded once (the hub cache), at `revision` (a branch, tag or commit of its repository; the
    backbones are named as `PUBLISHED` lists them, at theirs)."""
    if name not in PUBLISHED and name not in PUBLISHED_V1:
        raise ValueError(f"{name!r} is not a published OpenFlamingo checkpoint; choose from "
                         f"{sorted(PUBLISHED) + sorted(PUBLISHED_V1)}, or pass --checkpoint FILE --vision V --lm L")
    from huggingface_hub import hf_hub_download

    if name in PUBLISHED_V1:
        return hf_hub_download(name, PUBLISHED_V1[name], revision=revision), CLIP_VIT_L, None
    vision, lm = PUBLISHED[name]
    return hf_hub_download(name, "checkpoint.pt", revision=revision), vision, lm


def published_processor(name: str) -> FlamingoProcessor:
    """The processor `convert_openflamingo` gives a published 2.x checkpoint (`PUBLISHED`), from its backbones'
    tokenizer, image processor and LM config: the checkpoint is not downloaded. Its resampler has no frame embeddings
    (OpenFlamingo's factory builds none), so its `max_frames` is the default `infer_config` keeps."""
    if name not in PUBLISHED:
        raise ValueError(f"{name!r} is not a published OpenFlamingo 2.x checkpoint; choose from {sorted(PUBLISHED)}")
    vision, lm = PUBLISHED[name]
    processor, _ = flamingo_processor(lm, vision, max_frames=FlamingoConfig().max_frames,
                                      max_positions=config_max_positions(openflamingo_lm_config(lm)))
    return processor


def module_names(resampler_depth: int, xattn_layers: list[int]) -> list[tuple[str, str]]:
    """(OpenFlamingo's name, ours) of every resampler and block tensor, gates included: the one mapping the converter
    and the exporter (to_openflamingo.py) read in opposite directions. Block j sits before LM layer xattn_layers[j]."""
    pairs = [("perceiver.latents", "resampler.latents"), ("perceiver.norm.weight", "resampler.norm.weight"),
             ("perceiver.norm.bias", "resampler.norm.bias")]
    ffw = ("0.weight", "0.bias", "1.weight", "3.weight")  # LayerNorm, Linear, GELU, Linear
    for i in range(resampler_depth):
        pairs += [(f"perceiver.layers.{i}.0.{name}", f"resampler.layers.{i}.attn.{name}")
                  for name in ("norm_media.weight", "norm_media.bias", "norm_latents.weight", "norm_latents.bias",
                               "to_q.weight", "to_kv.weight", "to_out.weight")]
        pairs += [(f"perceiver.layers.{i}.1.{name}", f"resampler.layers.{i}.ffw.{name}") for name in ffw]
    for j, layer in enumerate(xattn_layers):
        block = f"lang_encoder.gated_cross_attn_layers.{layer}"
        pairs += [(f"{block}.attn.{name}", f"xattn.{j}.attn.{name}")
                  for name in ("norm.weight", "norm.bias", "to_q.weight", "to_kv.weight", "to_out.weight")]
        pairs += [(f"{block}.ff.{name}", f"xattn.{j}.ffw.{name}") for name in ffw]
        pairs += [(f"{block}.attn_gate", f"xattn.{j}.attn_gate"), (f"{block}.ff_gate", f"xattn.{j}.ffw_gate")]
    return pairs


def load_openflamingo_state(checkpoint: Union[str, os.PathLike, dict]) -> dict[str, torch.Tensor]:
    """Read an OpenFlamingo checkpoint without pickle and strip DDP/FSDP/compile wrapper prefixes."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if os.path.isdir(checkpoint):
            raise ValueError(f"{checkpoint} is a directory: pass the checkpoint file inside it (checkpoint.pt)")
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"OpenFlamingo checkpoint not found: {checkpoint}")
        try:  # mapped, not read: a whole `state_dict()` (Med-Flamingo's model.pt) holds a frozen LM never kept
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # a legacy (pre-zip) file cannot be mapped: read it whole
                raise unreadable(str(checkpoint), e) from e
            state = _load_whole(checkpoint)
        except Exception as e:
            raise unreadable(str(checkpoint), e) from e
    else:
        state = checkpoint
    where = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "the OpenFlamingo checkpoint"
    state = state_dict_of(state, where)
    if "model_state_dict" in state:
        state = state_dict_of(state["model_state_dict"], f"{where}'s model_state_dict")
    clean = {canonical_key(key): value for key, value in state.items()}
    if "perceiver.latents" not in clean:
        raise ValueError("not an OpenFlamingo checkpoint: no `perceiver.latents`")
    return clean


def canonical_key(key: str) -> str:
    """A checkpoint key without DDP/FSDP/checkpoint/compile wrapper segments, its block under
    `gated_cross_attn_layers`."""
    key = _WRAPPER_SEGMENT.sub("", key)
    while key.startswith(_DDP_PREFIX):
        key = key[len(_DDP_PREFIX):]
    # Released checkpoints keep the blocks under the wrapped decoder layers
    # (`lang_encoder.<layers>.{L}.gated_cross_attn_layer.*`); the live model also lists them as
    # `lang_encoder.gated_cross_attn_layers.{L}.*`. Both name the same tensors: use the second form.
    m = re.match(r"lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.(.*)$", key)
    return f"lang_encoder.gated_cross_attn_layers.{m.group(2)}.{m.group(3)}" if m else key


def _load_whole(checkpoint: Union[str, os.PathLike]) -> dict:
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unreadable(str(checkpoint), e) from e


def infer_config(state: dict[str, torch.Tensor], base: Optional[FlamingoConfig] = None) -> FlamingoConfig:
    """A FlamingoConfig with the shapes of an OpenFlamingo checkpoint."""
    config = FlamingoConfig() if base is None else FlamingoConfig.from_dict(base.to_dict())
    layers = sorted({int(m.group(1)) for k in state
                     if (m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", k))})
    if not layers:
        raise ValueError("OpenFlamingo checkpoint has no gated cross-attention layers")
    sized = ("perceiver.latents", "perceiver.layers.0.0.to_q.weight", "perceiver.layers.0.1.1.weight",
             f"lang_encoder.gated_cross_attn_layers.{layers[0]}.attn.to_q.weight")  # what the sizes are read from
    for key in sized:
        if key not in state:
            otter = any(".decoder_layer." in k for k in state)  # Otter's HF format wraps each LM layer so
            raise ValueError(f"OpenFlamingo checkpoint lacks {key!r}" + (
                " (its LM layers are wrapped as Otter's Hugging Face format writes them: convert it with "
                "`flamingo convert otter`)" if otter else ""))
        if not isinstance(state[key], torch.Tensor) or state[key].ndim != 2:
            raise ValueError(f"OpenFlamingo checkpoint's {key!r} is not a matrix: {getattr(state[key], 'shape', None)}")
    num_latents, dim = state["perceiver.latents"].shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    inner = state["perceiver.layers.0.0.to_q.weight"].shape[0]
    every = layers[0] + 1
    xinner = state[f"lang_encoder.gated_cross_attn_layers.{layers[0]}.attn.to_q.weight"].shape[0]
    config.num_latents, config.resampler_depth = int(num_latents), depth
    config.resampler_heads, config.resampler_head_dim = inner // OF_HEAD_DIM, OF_HEAD_DIM
    config.xattn_heads, config.xattn_head_dim = xinner // OF_HEAD_DIM, OF_HEAD_DIM
    config.ffw_mult = state["perceiver.layers.0.1.1.weight"].shape[0] // dim
    config.xattn_every = every
    config.resampler, config.gated, config.only_attend_last_image = "perceiver", True, True
    config.gate_type = "scalar"  # OpenFlamingo's gates are scalars
    if "perceiver.frame_embs" in state:
        config.max_frames = state["perceiver.frame_embs"].shape[0]
    if "perceiver.media_time_embs" in state:
        raise ValueError("OpenFlamingo media_time_embs are not supported (OpenFlamingo itself never builds them)")
    return config


def param_name(module: torch.nn.Module, target: torch.Tensor) -> str:
    return next(n for n, p in module.named_parameters(remove_duplicate=False) if p is target)


def convert_openflamingo(checkpoint: Union[str, os.PathLike, dict], vision: Any, lm: Any, tokenizer: Any = None, *,
                         image_processor: Any = None, config: Optional[FlamingoConfig] = None,
                         extra_tokens: Sequence[str] = (), template: str = "flamingo", attend_next_image: bool = False,
                         take_tensors: bool = False, padded_table: bool = False,
                         torch_dtype: Optional[torch.dtype] = None) -> tuple[Flamingo, FlamingoProcessor]:
    """Our model + processor with the weights of an OpenFlamingo checkpoint on the same backbones.

    lm: a model, or a name/directory loaded by `load_openflamingo_lm` (the published LMs, remote-code ones included,
    on classes transformers ships). OpenFlamingo cut the LM's table to its tokenizer (MPT's and RedPajama's padded
    50432 rows to 50280); the LM gets the checkpoint's row count too, and then refers to no name (save it whole).
    extra_tokens / template: `from_backbones`'s (a family's markers added after `<image>`, the processor's template).
    attend_next_image: the checkpoint is OpenFlamingo v1's (open_flamingo 0.0.x: OpenFlamingo-9B v1, Med-Flamingo),
    whose text sees the next image (the module docstring). take_tensors: the tensors of a `checkpoint` dict are the
    caller's to give (read for this conversion alone): those of the resampler and blocks become the parameters, not
    copies (a file's, memory-mapped, and a dict's otherwise, are copied: the model owns its memory). padded_table:
    the embedding table is an LM's own, saved whole (Otter's), whose rows may run past the tokenizer's (padding);
    otherwise it has exactly the training tokenizer's rows (`check_table_rows`). torch_dtype: the backbones are read
    in it (a named LM loads in it, no float32 copy first) and the checkpoint's tensors are cast to it; default
    float32 for a named LM, a given model's own dtype otherwise.

    The tokenizer must be the LM's own, without Flamingo's tokens: their rows are the checkpoint's added rows. One
    that already holds them (saved beside an OpenFlamingo or a model of ours) adds nothing, and a checkpoint table
    with rows past the LM's is refused (`check_tokens_added`): those rows would be dropped."""
    state = load_openflamingo_state(checkpoint)
    if tower_prefix(state) == _V1_TOWER and not attend_next_image:  # only open_flamingo 0.0.x saves its whole CLIP
        raise ValueError("the checkpoint holds OpenFlamingo v1's whole CLIP (vision_encoder.visual.*): it is a v1 "
                         "checkpoint (open_flamingo 0.0.x: OpenFlamingo-9B v1, Med-Flamingo), whose text sees the "
                         "next image; convert it with --v1 (attend_next_image=True)")
    config = infer_config(state, config)
    config.attend_next_image = attend_next_image
    if isinstance(lm, (str, os.PathLike)):
        tokenizer = tokenizer if tokenizer is not None else str(lm)
        lm = load_openflamingo_lm(lm, torch_dtype=torch_dtype)
    emb_key = "lang_encoder." + param_name(lm, lm.get_input_embeddings().weight)
    shrunk = emb_key in state and state[emb_key].shape[0] < lm.get_input_embeddings().num_embeddings
    if shrunk:
        lm.resize_token_embeddings(state[emb_key].shape[0], mean_resizing=False)
    model, processor = from_backbones(vision, lm, tokenizer, config, image_processor=image_processor,
                                      torch_dtype=torch_dtype, extra_tokens=extra_tokens, template=template,
                                      resampler_and_blocks_on_meta=True)  # the checkpoint's are assigned below
    config = model.config
    if shrunk:
        config.lm_name_or_path = None
    layers = sorted({int(m.group(1)) for k in state
                     if (m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", k))})
    if layers != model.xattn_layer_indices:
        raise ValueError(f"checkpoint has cross-attention before layers {layers}, expected "
                         f"{model.xattn_layer_indices} for xattn_every={config.xattn_every}")

    pairs = module_names(config.resampler_depth, layers)
    missing = [src for src, _ in pairs if src not in state]
    if missing:
        raise ValueError(f"OpenFlamingo checkpoint lacks {missing[0]!r}")
    mapped = {dst: state[src] for src, dst in pairs}
    used = {src for src, _ in pairs}
    ours = model.state_dict(keep_vars=True)  # the resampler's and blocks' parameters on meta: shapes and dtypes
    time = torch.zeros(ours["resampler.time_embeddings"].shape)
    if "perceiver.frame_embs" in state:
        time = state["perceiver.frame_embs"]
        used.add("perceiver.frame_embs")
    mapped["resampler.time_embeddings"] = time

    first, n = config.first_new_token_id, config.num_new_tokens
    embedding = model.lm.get_input_embeddings().weight
    emb_key = "lang_encoder." + param_name(model.lm, embedding)
    if emb_key not in state:  # every OpenFlamingo release trains the whole table and saves it
        raise ValueError(f"the OpenFlamingo checkpoint lacks {emb_key!r}, the LM's input table it trained: without "
                         "it the rows of <image> and <|endofchunk|> would be untrained (an incomplete file, or an LM "
                         "other than the one it was trained on)")
    table = state[emb_key]
    used.add(emb_key)
    if table.ndim != 2 or table.shape[1] != embedding.shape[1]:
        raise ValueError(f"the checkpoint's embedding table {emb_key!r} is {tuple(table.shape)}, the LM's rows "
                         f"are {embedding.shape[1]} wide: is it the LM the checkpoint was trained on?")
    if n:
        if not padded_table:
            check_table_rows(table.shape[0], first, n, processor.tokenizer.pad_token_id)
        elif table.shape[0] < first + n:
            raise ValueError(f"the LM's embedding table has {table.shape[0]} rows; the tokenizer needs {first + n}")
        mapped["new_token_embeddings"] = table[first:first + n]
    else:
        check_tokens_added(table.shape[0], embedding.shape[0], config.media_token_id)
    base = table[: first if n else embedding.shape[0]]
    used.update(tied_copies(model.lm, state, table.shape))
    head = model.lm.get_output_embeddings()
    if model.new_lm_head is not None:  # untied: its added rows (a bias's too, Phi's) are the checkpoint's
        for ours_name, param in (("new_lm_head", head.weight), ("new_lm_head_bias", getattr(head, "bias", None))):
            if param is None or getattr(model, ours_name) is None:
                continue
            head_key = "lang_encoder." + param_name(model.lm, param)
            if head_key in state:
                check_head_base_rows(state[head_key], param, first, head_key)
                mapped[ours_name] = state[head_key][first:first + n]
                used.add(head_key)

    unknown = sorted(set(mapped) - set(ours))
    if unknown:
        raise ValueError(f"conversion produced unknown keys: {unknown}")
    check_state_shapes(ours, mapped, "the OpenFlamingo checkpoint",
                       "is it the LM and vision tower the checkpoint was trained on?")
    ignored = [k for k in state if k not in used]
    # a whole-state checkpoint also holds its frozen backbones: each must have its place in the given ones (its LM
    # values are compared below); anything else unread would be dropped, and the model compute another function
    foreign = set(unplaced_backbone_tensors({k: state[k] for k in ignored}, model.lm, model.vision))
    foreign.update(k for k in ignored if k.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers."))
                   or not k.startswith(("lang_encoder.", "vision_encoder.")))
    if foreign:
        listed = [k for k in state if k in foreign]
        raise ValueError(f"the OpenFlamingo checkpoint holds tensors the conversion has no place for: {listed[:5]}"
                         f"{f' (and {len(listed) - 5} more)' if len(listed) > 5 else ''} (a module or bias the "
                         "given backbones lack, a LoRA, or another LM or vision tower than the given ones)")
    if not torch.equal(base.to(embedding.dtype), embedding[: base.shape[0]]):
        with torch.no_grad():  # OpenFlamingo fine-tuned the whole table: keep its rows
            embedding[: base.shape[0]].copy_(base)
        saved = "lm." + emb_key[len("lang_encoder."):]
        config.extra_saved_weights = sorted(set(config.extra_saved_weights) | {saved})
    # each a tensor of its own in the parameter's dtype (never a view into a mapped file or a larger table), assigned
    take = take_tensors and not isinstance(checkpoint, (str, os.PathLike))
    model.load_state_dict({k: v.to(ours[k].dtype, copy=not (take and v.untyped_storage().nbytes() == v.nbytes))
                           for k, v in mapped.items()}, strict=False, assign=True)
    unset = meta_tensors(model)
    if unset:
        raise ValueError(f"the OpenFlamingo checkpoint leaves {unset[:3]} unset")
    check_frozen_lm({k: state[k] for k in ignored}, model.lm)
    check_frozen_vision({k: state[k] for k in ignored}, model.vision)
    if ignored:
        log.info("OpenFlamingo conversion ignored %d frozen backbone tensors (e.g. %s)", len(ignored), ignored[0])
    return model.eval(), processor


def check_table_rows(rows: int, first: int, n: int, pad_token_id: Optional[int]) -> None:
    """An OpenFlamingo embedding table holds the training tokenizer's rows then its added tokens' (`<|endofchunk|>`,
    `<image>`, `<PAD>` when it had no pad token): `first` + `n` rows for the given tokenizer (`first` tokens, `n`
    added), or one more when the given tokenizer has a pad token of its own and the training one did not (`<PAD>`
    is then the last row). Another count means another tokenizer, whose rows `first`... are not these tokens."""
    fits = [first + n] + ([first + n + 1] if pad_token_id is not None and pad_token_id < first else [])
    if rows not in fits:
        raise ValueError(f"the checkpoint's embedding table has {rows} rows, the tokenizer {first} tokens + {n} "
                         f"added ({' or '.join(map(str, fits))} rows): the checkpoint was trained with another "
                         "tokenizer; pass that one (--tokenizer, tokenizer=)")


def check_tokens_added(rows: int, lm_rows: int, media_token_id: int) -> None:
    """Nothing was added to the tokenizer (it already holds `<image>` and `<|endofchunk|>`): a checkpoint table with
    rows past the LM's holds the trained rows of those tokens, which would be dropped and the token ids left outside
    the LM's table. The tokenizer is the cause, not the LM."""
    if rows > lm_rows:
        raise ValueError(f"the tokenizer already holds Flamingo's tokens (<image> is id {media_token_id}), so none "
                         f"were added, and the checkpoint's embedding table has {rows} rows, past the LM's {lm_rows}: "
                         "its rows for those tokens would be dropped. Pass the LM's own tokenizer, without <image> "
                         "and <|endofchunk|> (--tokenizer, tokenizer=): the conversion adds them")


def check_head_base_rows(theirs: torch.Tensor, ours: torch.Tensor, first: int, key: str) -> None:
    """An untied head's tensor (weight or bias) in a whole-state checkpoint: its rows of the LM's own vocabulary are
    the frozen LM's (OpenFlamingo trains none of them), so they must equal the given LM's. Only its added rows are
    read; another LM's head would otherwise go unnoticed (`check_frozen_lm` samples the tensors left unread).
    Compared in blocks of rows: no copy of the whole head."""
    if theirs.data_ptr() == ours.data_ptr():  # the LM's own tensor (Otter's)
        return
    fits = theirs.shape[1:] == ours.shape[1:] and theirs.shape[0] >= first
    blocks = [slice(i, min(i + HEAD_ROWS_BLOCK, first)) for i in range(0, first, HEAD_ROWS_BLOCK)]
    if not fits or not all(_close(ours[rows], theirs[rows]) for rows in blocks):
        raise ValueError(f"the checkpoint holds the frozen LM it was trained on, and its tensors differ from the given "
                         f"LM's ({key!r}, {tuple(theirs.shape)}, in its first {first} rows, the output head's): pass "
                         "the LM the checkpoint was trained on (--lm)")


def tied_copies(lm: torch.nn.Module, state: Mapping[str, torch.Tensor], shape: torch.Size) -> set[str]:
    """The checkpoint keys naming the LM's input table under another name (a head tied to it, as a whole
    `state_dict()` saves it twice) that have the table's shape: the same tensor, read once as the table."""
    embedding = lm.get_input_embeddings().weight
    names = [n for n, p in lm.named_parameters(remove_duplicate=False) if p is embedding]
    return {f"lang_encoder.{n}" for n in names if f"lang_encoder.{n}" in state and state[f"lang_encoder.{n}"].shape
            == shape}


# buffers older transformers saved and newer ones compute (rotary frequencies and caches, position ids, causal mask
# scalars; causal masks are bool): never weights, so a whole-state checkpoint's copies have no place to take
_DERIVED_BUFFER = re.compile(r"(^|\.)(inv_freq|cos_cached|sin_cached|masked_bias|position_ids)$")
# open_clip's VisionTransformer, as OpenFlamingo 2.x's `vision_encoder` (the `.visual` of its CLIP) saves it
_OPEN_CLIP_VIT = re.compile(r"(conv1\.weight|class_embedding|positional_embedding|proj|ln_(pre|post)\.(weight|bias)"
                            r"|transformer\.resblocks\.(?P<layer>\d+)\.(ln_[12]\.(weight|bias)|attn\.in_proj_(weight|bias)"
                            r"|attn\.out_proj\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias)|ls_[12]\.gamma))$")
# v1 (open_flamingo 0.0.x: Med-Flamingo, Multimodal-GPT) keeps open_clip's whole CLIP as `vision_encoder` and runs its
# `.visual`: the tower sits under this prefix, and CLIP's text tower (frozen, never run) beside it under these names
_V1_TOWER = "vision_encoder.visual."
_OPEN_CLIP_TEXT = re.compile(r"(positional_embedding|text_projection|logit_scale|token_embedding\.weight"
                             r"|ln_final\.(weight|bias)|transformer\.resblocks\.\d+\.(ln_[12]\.(weight|bias)"
                             r"|attn\.in_proj_(weight|bias)|attn\.out_proj\.(weight|bias)|mlp\.c_(fc|proj)\.(weight|bias)"
                             r"|ls_[12]\.gamma))$")


# open_clip's ViT tensor -> the HF CLIP tower's holding the same values (transformers' CLIP conversion copies them);
# `in_proj_weight` (q, k and v fused) and `proj` (outside CLIPVisionModel) have none
_OPEN_CLIP_TO_HF = (
    (r"conv1\.weight", "embeddings.patch_embedding.weight"), (r"class_embedding", "embeddings.class_embedding"),
    (r"positional_embedding", "embeddings.position_embedding.weight"),
    (r"ln_pre\.(weight|bias)", r"pre_layrnorm.\1"), (r"ln_post\.(weight|bias)", r"post_layernorm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"))


def lm_name(key: str, layers_path: str) -> str:
    """A whole-state checkpoint's `lang_encoder.` key -> the LM's own name: OpenFlamingo wraps each decoder layer
    (`...{i}.decoder_layer.*`) and keeps the unwrapped list as `old_decoder_blocks.{i}.*` (the same tensors)."""
    name = key[len("lang_encoder."):].replace(".decoder_layer.", ".")
    m = re.match(r"old_decoder_blocks\.(\d+)\.(.*)$", name)
    return f"{layers_path}.{m.group(1)}.{m.group(2)}" if m else name


def lm_tensors(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LM's state under its own names: LoRA adapters a config injected (`lm_lora`) left out, and the wrapped
    weights under their names before (`.base_layer.` removed), as a checkpoint of the frozen LM names them."""
    return {name.replace(".base_layer.", "."): value for name, value in lm.state_dict().items() if ".lora_" not in name}


def tower_prefix(state: Mapping[str, Any]) -> str:
    """Where a whole-state checkpoint holds its vision tower: under `vision_encoder.visual.` where any key is (v1's
    whole CLIP; its other `vision_encoder.` keys are the text tower), under `vision_encoder.` otherwise (2.x)."""
    return _V1_TOWER if any(key.startswith(_V1_TOWER) for key in state) else "vision_encoder."


def tower_name(key: str, ours: Mapping[str, torch.Tensor], prefix: str = "vision_encoder.") -> Optional[str]:
    """A whole-state checkpoint's key under the tower's `prefix` (`tower_prefix`) -> the name in `ours` (the given
    tower's state) of the tensor it copies: its HF name (behind a wrapper's `tower.` or not, with or without
    `vision_model.`), or the HF name of an open_clip tensor (`_OPEN_CLIP_TO_HF`); None where there is none."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix):].removeprefix("tower.")
    name = next((re.sub(f"^{pattern}$", hf, name) for pattern, hf in _OPEN_CLIP_TO_HF if re.fullmatch(pattern, name)),
                name)
    return next((n for n in (name, f"vision_model.{name}", name.removeprefix("vision_model.")) if n in ours), None)


def _derived(name: str, value: torch.Tensor) -> bool:
    return bool(_DERIVED_BUFFER.search(name)) or value.dtype == torch.bool


def unplaced_backbone_tensors(state: Mapping[str, torch.Tensor], lm: torch.nn.Module, vision: torch.nn.Module
                              ) -> list[str]:
    """The keys of a whole-state checkpoint's frozen backbone copies with no place in the given backbones: an
    `lang_encoder.` tensor whose name (`lm_name`) the LM lacks or has in another shape; a tensor under the tower's
    prefix (`tower_prefix`) that is neither the given tower's (its HF names, behind a wrapper's `tower.` or not) in
    the same shape nor one of open_clip's ViT tensors within the tower's depth (their shapes and values are
    `check_frozen_vision`'s); beside a v1 tower, a `vision_encoder.` tensor not of CLIP's text tower. Derived buffers
    (`_DERIVED_BUFFER`) are skipped. Reads no tensor data."""
    ours_lm, ours_vision = lm_tensors(lm), vision.state_dict()
    layers_path = find_decoder_layers(lm)
    depth = getattr(getattr(vision, "config", None), "num_hidden_layers", None)
    prefix = tower_prefix(state)
    unplaced = []
    for key, value in state.items():
        if key.startswith("lang_encoder."):
            name = lm_name(key, layers_path)
            placed = name in ours_lm and ours_lm[name].shape == value.shape
        elif key.startswith("vision_encoder.") and not key.startswith(prefix):  # v1's text tower: frozen, unused
            name = key[len("vision_encoder."):]
            placed = bool(_OPEN_CLIP_TEXT.fullmatch(name))
        elif key.startswith("vision_encoder."):
            name = key[len(prefix):].removeprefix("tower.")
            names = (name, f"vision_model.{name}", name.removeprefix("vision_model."))
            placed = any(n in ours_vision and ours_vision[n].shape == value.shape for n in names)
            m = _OPEN_CLIP_VIT.fullmatch(name)
            placed = placed or bool(m and (m.group("layer") is None or depth is None or int(m.group("layer")) < depth))
        else:
            continue
        if not placed and not _derived(name, value):
            unplaced.append(key)
    return unplaced


def check_frozen_lm(state: dict[str, torch.Tensor], lm: torch.nn.Module, samples: int = FROZEN_LM_SAMPLES) -> None:
    """A checkpoint saved whole (Med-Flamingo's `model.pt`, a `model.state_dict()`) also holds the frozen LM it was
    trained on, under `lang_encoder.` (names as `lm_name` maps them). Those tensors are not converted, but they must
    be the LM's: raise when they differ (another LM, or another conversion of it, than the checkpoint's), at the
    lower precision of the two. `samples` of them, spread over the LM, are compared (another LM differs in every
    tensor): the rest of a memory-mapped checkpoint is never read. `unplaced_backbone_tensors` refuses, before,
    those with no place in the LM; `check_frozen_vision` compares the vision tower's."""
    ours = lm_tensors(lm)
    layers_path = find_decoder_layers(lm)
    pairs = []
    for key, value in state.items():
        name = lm_name(key, layers_path) if key.startswith("lang_encoder.") else None
        if name is not None and name in ours and ours[name].shape == value.shape and value.is_floating_point():
            pairs.append((name, value))
    step = max(1, -(-len(pairs) // samples))  # ceil: at most `samples`, the first and the spread of the rest
    differ = [name for name, value in pairs[::step] if not _close(ours[name], value)]
    if differ:
        raise ValueError(f"the checkpoint holds the frozen LM it was trained on, and its tensors differ from the "
                         f"given LM's (e.g. {differ[0]!r}): pass the LM the checkpoint was trained on (--lm)")


def check_frozen_vision(state: dict[str, torch.Tensor], vision: torch.nn.Module,
                        samples: int = FROZEN_VISION_SAMPLES) -> None:
    """`check_frozen_lm` for the frozen vision tower a whole checkpoint holds under `vision_encoder.` (2.x) or
    `vision_encoder.visual.` (v1: Med-Flamingo's `model.pt`; `tower_prefix`), in the HF tower's layout or open_clip's:
    each tensor naming one of the given tower's (`tower_name`) must have its shape, and `samples` of them, spread over
    the tower, its values at the lower precision of the two. Another tower of the same shape (another ViT-L/14)
    differs in every tensor. v1's CLIP text tower beside it is not compared: the model never runs it."""
    ours = vision.state_dict()
    prefix = tower_prefix(state)
    pairs = [(key, name, value) for key, value in state.items()
             if value.is_floating_point() and (name := tower_name(key, ours, prefix)) is not None]
    step = max(1, -(-len(pairs) // samples))
    differ = [(key, name, tuple(value.shape)) for key, name, value in pairs if ours[name].shape != value.shape]
    differ = differ or [(key, name, None) for key, name, value in pairs[::step] if not _close(ours[name], value)]
    if differ:
        key, name, shape = differ[0]
        given = f": {shape} there, {tuple(ours[name].shape)} in the given tower" if shape else ""
        raise ValueError(f"the checkpoint holds the frozen vision tower it was trained on, and its tensors differ from "
                         f"the given tower's (e.g. {key!r}{given}): pass the vision tower the checkpoint was trained "
                         "on (--vision)")


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal up to the rounding of the less precise dtype of the two (a bf16 LM against its float32 copy), compared
    in that dtype: no float32 copies."""
    dtype = ours.dtype if ours.dtype.itemsize < theirs.dtype.itemsize else theirs.dtype
    return torch.allclose(ours.to(dtype), theirs.to(dtype), rtol=1e-3, atol=1e-5)
