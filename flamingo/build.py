"""`from_backbones`: a Flamingo model + processor from any HF vision tower and causal LM (objects or names)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import PROCESSOR_CONFIG_NAME, FlamingoConfig
from .model import lora
from .model.backbones import lm_max_positions, load_lm, load_vision_tower, name_or_path_of
from .model.cast import to_dtype
from .model.flamingo import Flamingo, checked_torch_dtype
from .processing import (
    FlamingoProcessor,
    add_flamingo_tokens,
    has_saved_processor,
    load_image_processor,
    load_tokenizer,
)
from .references import reference_token
from .runtime.compat import dtype_kwargs
from .runtime.hub import hub_commit, is_commit, is_hub_reference, local_dir, metadata_dir

log = logging.getLogger(__name__)

Backbone = Union[str, os.PathLike, nn.Module]


def from_backbones(vision: Backbone, lm: Backbone, tokenizer: Optional[Union[str, PreTrainedTokenizerBase]] = None,
                   config: Optional[FlamingoConfig] = None, *, image_processor: Any = None,
                   torch_dtype: Union[torch.dtype, str, None] = None, max_length: Optional[int] = None,
                   extra_tokens: Sequence[str] = (), template: str = "flamingo",
                   resampler_and_blocks_on_meta: bool = False, vision_revision: Optional[str] = None,
                   lm_revision: Optional[str] = None) -> tuple[Flamingo, FlamingoProcessor]:
    """Build a Flamingo on pretrained backbones.

    vision / lm: HF models or names/paths for `from_pretrained` (names are kept in the config so that trained-only
    checkpoints can refer to them; a Hub name with the commit it is read at, `backbone_commit`). vision_revision /
    lm_revision: the Hub branch, tag or commit of a backbone given by its Hub name (default: the config's
    `*_revision`, else the default branch), or the one an in-memory backbone was loaded at (transformers 5 records
    none); refused for a local path. tokenizer / image_processor default to the ones saved with the LM / tower (at
    that commit).
    Adds `<image>`, `<|endofchunk|>` (a pad token if missing, and `config.num_image_references` reference tokens
    `<image0>`, ...) to the tokenizer, `extra_tokens` right after `<image>` (a family's own markers); their
    embedding rows are the only new trainable rows. template: the processor's (`FlamingoProcessor`).
    resampler_and_blocks_on_meta: `Flamingo`'s (a converter that assigns them all). torch_dtype: a torch dtype or
    its name (`checked_torch_dtype`; None or "auto": the backbones' own, and the resampler and blocks in the default
    dtype: float32 blocks beside in-memory half-precision backbones compute in float32). Returns (model, processor).
    """
    config = dataclasses.replace(config) if config is not None else FlamingoConfig()
    torch_dtype = checked_torch_dtype(torch_dtype)
    kwargs = dtype_kwargs(torch_dtype)
    vision_ref, lm_ref = name_or_path_of(vision), name_or_path_of(lm)
    if vision_revision is None:
        vision_revision = _configured(config.vision_name_or_path, config.vision_revision, vision_ref)
    if lm_revision is None:
        lm_revision = _configured(config.lm_name_or_path, config.lm_revision, lm_ref)
    vision_commit = backbone_commit(vision, vision_ref, vision_revision, "vision tower", "vision_revision")
    lm_commit = backbone_commit(lm, lm_ref, lm_revision, "LM", "lm_revision")
    vision_model = load_vision_tower(vision, **kwargs, **_at(vision, vision_commit))
    lm_model = load_lm(lm, **kwargs, **_at(lm, lm_commit))

    if tokenizer is None and lm_ref is None:
        raise ValueError("pass `tokenizer`: the LM is an in-memory model with no name/path to load one from")
    if image_processor is None and vision_ref is None:
        raise ValueError("pass `image_processor`: the vision tower is an in-memory model with no name/path")
    processor, added = flamingo_processor(tokenizer if tokenizer is not None else _files(lm_ref, lm_commit, "LM"),
                                          image_processor if image_processor is not None
                                          else _files(vision_ref, vision_commit, "vision tower"),
                                          max_frames=config.max_frames, max_positions=lm_max_positions(lm_model),
                                          max_length=max_length, num_image_references=config.num_image_references,
                                          extra_tokens=extra_tokens, template=template)
    tokenizer = processor.tokenizer
    config.vision_name_or_path, config.lm_name_or_path = vision_ref, lm_ref
    config.vision_revision, config.lm_revision = vision_commit, lm_commit
    config.media_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    references = [tokenizer.convert_tokens_to_ids(reference_token(k)) for k in range(config.num_image_references)]
    if not set(references) <= set(added):  # added in order, so contiguous; trained like the other added rows
        raise ValueError(f"the tokenizer already had reference tokens <image0>...: {references}; they must be new")
    config.first_reference_token_id = references[0] if references else None
    if added:
        if added != list(range(added[0], added[0] + len(added))):
            raise ValueError(f"added token ids are not contiguous: {added}")
        config.first_new_token_id, config.num_new_tokens = added[0], len(added)
    else:
        config.first_new_token_id, config.num_new_tokens = None, 0
    vocab = lm_model.get_input_embeddings().num_embeddings
    check_token_rows(tokenizer, config, added, vocab)
    config.pad_token_id = tokenizer.pad_token_id
    if config.lm_lora is not None:  # new adapters: each target name must match (a typo trains without its own)
        lora.check_targets(lm_model, config.lm_lora)
    model = Flamingo(vision_model, lm_model, config, resampler_and_blocks_on_meta=resampler_and_blocks_on_meta)
    if torch_dtype is not None:  # the resampler and blocks in the backbones' dtype (built in the default one)
        to_dtype(model, torch_dtype)
    if config.quantize_frozen != "none":  # packed on the device the model will run on, not here (int4 is CUDA's)
        warnings.warn(f"FlamingoConfig.quantize_frozen={config.quantize_frozen!r} is applied when a model loads "
                      "(load_pretrained) or trains (flamingo train), not by from_backbones: these backbones are in "
                      "float. Call flamingo.model.quantize.quantize_frozen(model) after model.to(device) to run them "
                      "quantized (a save records the mode, and loads quantized)", stacklevel=2)
    return model, processor


def backbone_commit(backbone: Backbone, ref: Optional[str], revision: Optional[str], what: str,
                    argument: str) -> Optional[str]:
    """The Hub commit a backbone is recorded at (`FlamingoConfig.vision_revision` / `lm_revision`), so that a
    trained-only checkpoint loads the same weights after its repository moves on. For a Hub name (`ref`): `revision`
    resolved to its commit, else the commit of the default branch now (the one that loads). For an in-memory model
    with a Hub name: `revision` (the one it was loaded at) resolved, else the commit its config records
    (transformers 4's `_commit_hash`), else None: transformers 5 records none, and a trained-only save then warns.
    None for a local path or a model without a name (no revisions: `revision` is refused)."""
    if ref is None or not is_hub_reference(ref):
        if revision is not None:
            where = f"the local path {ref!r}" if ref is not None else "an in-memory model with no name"
            raise ValueError(f"{argument}={revision!r} names a version of a Hub repository, and the {what} is {where}, "
                             "which has no revisions: drop it")
        return None
    if revision is None and isinstance(backbone, nn.Module):
        known = getattr(getattr(backbone, "config", None), "_commit_hash", None)
        if not is_commit(known):
            return None
        revision = known
    return hub_commit(ref, what, revision=revision)


def _configured(name: Optional[str], revision: Optional[str], ref: Optional[str]) -> Optional[str]:
    """The revision a given config asks for a backbone: its `*_revision` when it names no backbone (a new config,
    e.g. `model.flamingo` of a training run) or this one by the same Hub name; None for a config copied from a model
    on other backbones or on a local copy (`convert.write_backbones`), whose recorded commit is not this one's."""
    if revision is None or name is None:
        return revision
    return revision if name == ref and is_hub_reference(ref) else None


def _at(backbone: Backbone, commit: Optional[str]) -> dict[str, Any]:
    """`from_pretrained`'s revision for a backbone given by its Hub name: the commit recorded for it."""
    return {"revision": commit} if commit is not None and not isinstance(backbone, nn.Module) else {}


def _files(ref: Optional[str], commit: Optional[str], what: str) -> Optional[str]:
    """Where a backbone's tokenizer or image processor is read from: for a Hub name at a commit, its configs and
    tokenizer files at that commit (`metadata_dir`); else the name/path itself."""
    return metadata_dir(ref, what, revision=commit) if ref is not None and commit is not None else ref


def check_token_rows(tokenizer: PreTrainedTokenizerBase, config: FlamingoConfig, added: Sequence[int],
                     vocab: int) -> None:
    """Refuse a tokenizer that already held a Flamingo token (so it was not added now, and got no trainable row) at
    an id past the LM's `vocab` rows (the tokenizer saved beside a Flamingo model or after OpenFlamingo's training):
    the model would build, save and convert, and fail at its first forward with an id outside the LM's table. Within
    them (a converted Otter's tokenizer, whose LM table holds its trained rows; a special token the LM reserves, as
    PaliGemma's Gemma does for `<image>`) the model reads the LM's own row: said once, since a frozen LM's row is not
    trained as Flamingo's added rows are."""
    for name, tid in (("<image>", config.media_token_id), ("<|endofchunk|>", config.end_of_chunk_token_id)):
        if tid in added:
            continue
        held = (f"the tokenizer ({type(tokenizer).__name__} "
                f"{getattr(tokenizer, 'name_or_path', '') or 'in memory'!r}) already holds {name} at id {tid}")
        if tid >= vocab:
            raise ValueError(f"{held}, past the LM's {vocab} embedding rows, so the model has no row for it: pass the "
                             "LM's own tokenizer, without Flamingo's tokens (they are added and trained here)")
        if config.freeze_lm:
            log.warning("%s, among the LM's %d embedding rows: the model reads the LM's own row for it, which "
                        "training leaves as it is (a frozen LM); Flamingo's added tokens get rows that train",
                        held, vocab)
    if config.media_token_id >= max(vocab, len(tokenizer)):
        raise ValueError("tokenizer and LM vocabulary disagree")


def flamingo_processor(tokenizer: Union[str, os.PathLike, PreTrainedTokenizerBase], image_processor: Any, *,
                       max_frames: int, max_positions: Optional[int], max_length: Optional[int] = None,
                       num_image_references: int = 0, extra_tokens: Sequence[str] = (), template: str = "flamingo"
                       ) -> tuple[FlamingoProcessor, list[int]]:
    """The processor of a model built on these backbones (`from_backbones`), and the ids of the tokens it added.

    tokenizer: an object, or a name/path to load one from; image_processor: an object, or the vision tower's
    name/path to load its own from. Adds Flamingo's tokens (`add_flamingo_tokens`: `num_image_references`,
    `extra_tokens`). max_positions: the LM's (`lm_max_positions`), which bound the processor's length when
    `max_length` is None (the tokenizer may not know its LM's context, or think it longer). Reads no weights.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(image_processor, (str, os.PathLike)):
        image_processor = load_image_processor(str(image_processor))
    added = add_flamingo_tokens(tokenizer, num_image_references, extra_tokens)
    processor = FlamingoProcessor(tokenizer, image_processor, max_length=max_length, max_frames=max_frames,
                                  template=template)
    if max_length is None and max_positions is not None:
        processor.max_length = min(processor.max_length or max_positions, max_positions)
    return processor, added


def load_pretrained(name_or_path: str, *, revision: Optional[str] = None,
                    **kwargs: Any) -> tuple[Flamingo, FlamingoProcessor]:
    """A saved model and its processor (`save_pretrained(dir, processor=...)`): a directory, or a Hub repository
    holding one (`org/name`, at `revision`: a branch, tag or commit), downloaded once into the hub cache. kwargs:
    `Flamingo.from_pretrained`'s. A repository that is no saved Flamingo, and a model saved without its processor,
    are refused before its weights are read (a Hub repository's configs are fetched first, `check_processor_saved`)."""
    inspect.signature(Flamingo.from_pretrained).bind(name_or_path, **kwargs)  # a TypeError before any download
    meta = metadata_dir(name_or_path, "Flamingo model", revision=revision)
    FlamingoConfig.load(meta)  # a repository that is no saved Flamingo (an LM, a CLIP) is refused before its weights
    check_processor_saved(meta, name_or_path)
    directory = local_dir(name_or_path, "Flamingo model", revision=revision)
    model = Flamingo.from_pretrained(directory, **kwargs)
    model.name_or_path = os.fspath(name_or_path)  # the name given (a Hub name, not its cache directory)
    return model, FlamingoProcessor.from_pretrained(directory)


def check_processor_saved(directory: str, name_or_path: str) -> None:
    """Refuse a saved model whose `directory` (its configs suffice) holds no processor: neither
    `flamingo_processor.json` nor tokenizer files. `load_pretrained` and every loader built on it return a processor,
    and pairing the weights with another model's tokenizer would embed the wrong ids without an error."""
    if not has_saved_processor(directory):
        raise ValueError(f"{name_or_path!r} was saved without its processor (it holds no {PROCESSOR_CONFIG_NAME} nor "
                         "tokenizer files): save it with save_pretrained(..., processor=processor), or load the model "
                         "with Flamingo.from_pretrained and build its processor from the tokenizer and image "
                         "processor it was trained with")
