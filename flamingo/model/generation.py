"""Generation and scoring with cached cross-attention.

What is computed once per prompt, and what per decode step:
- the vision tower and the resampler: once per prompt (`Flamingo.encode_media`);
- each block's K/V projections of the visual tokens: once per prompt, kept in the call's `MediaContext`, expanded to
  beams / return sequences by indexing (never re-projected);
- the LM's own KV cache: HF's cache object, driven by HF's `generate` (greedy, sampling, beam search, logits
  processors, stopping criteria all come from transformers);
- the media index of new tokens: the last media index of their row, kept in the context. `<image>` can't be
  generated, so a row's image changes while decoding only through a generated reference token (`<imageK>`, models
  with `num_image_references`), which the context follows per row.
The call's phase is set here, by the caller of the LM: `generate` runs the prompt under PREFILL and switches to DECODE
when transformers hands the prompt's logits to the logits processors (`EnterDecode`), so a prompt prefilled in
chunks stays in PREFILL; `score_batch` runs the contexts under FORWARD and each chunk of candidates under its own
SCORE context (context.py).
"""

from __future__ import annotations

import copy
import logging
import operator
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..runtime.compat import (
    CACHE_NAMES,
    TRANSFORMERS,
    TRANSFORMERS_VERSION,
    lm_cache_argument,
    lm_last_logits_only,
    lm_output_cache,
    select_cache_rows,
)
from ..runtime.warn import warn_outside
from .backbones import lm_max_positions
from .context import MediaContext, Phase
from .feature_cache import VisionFeatureCache
from .xattn import XAttnImpl

if TYPE_CHECKING:  # annotations only: the model's methods call this module
    from .flamingo import Flamingo

log = logging.getLogger(__name__)


def _check_inputs(model: Flamingo, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  images: Optional[torch.Tensor], num_media: Optional[torch.Tensor],
                  num_frames: Optional[torch.Tensor], visual_tokens: Optional[torch.Tensor]) -> None:
    """A generate / score call's inputs, before any work: shapes, and the prompt's token ids on any device (one host
    sync per call)."""
    model.check_input_shapes(input_ids, images, num_media, visual_tokens, num_frames=num_frames,
                             attention_mask=attention_mask)
    if input_ids.device.type != "cpu":  # on the CPU check_input_shapes did
        model.check_token_ids(input_ids)


def prompt_mask(model: Flamingo, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                what: str) -> torch.Tensor:
    """A prompt batch's attention mask, checked: left padding (each prompt's tokens last in its row, as decoding
    appends to every row) and a token in every row. Without one, the batch's padding is read off the model's pad id
    (as transformers' generate reads it, unless the pad id is an EOS), else every position is a token."""
    if attention_mask is None:
        config = generation_config_for(model)
        pad = config.pad_token_id
        if pad is not None and pad not in config.eos_token_id and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError(f"{what} needs left padding (each prompt's tokens last in its row): the processor pads on "
                         "the left unless given padding_side='right'")
    empty = attention_mask.sum(dim=1) == 0
    if bool(empty.any()):
        raise ValueError(f"prompt {int(empty.nonzero()[0])} of the batch has no tokens (its row is all padding)")
    return attention_mask


def _media_for(model: Flamingo, input_ids: torch.Tensor, images: Optional[torch.Tensor],
               num_media: Optional[torch.Tensor], num_frames: Optional[torch.Tensor],
               visual_tokens: Optional[torch.Tensor], vision_cache: Optional[VisionFeatureCache] = None
               ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if visual_tokens is None and images is not None:
        if num_media is None:
            num_media = torch.full((input_ids.shape[0],), images.shape[1], dtype=torch.long)
        if bool(torch.as_tensor(num_media).any()):  # else no row holds a medium: a text-only batch, as in forward
            visual_tokens = model.encode_media(images, num_media, num_frames, vision_cache=vision_cache)
    elif visual_tokens is not None:
        visual_tokens = model.as_visual_tokens(visual_tokens)
        if num_media is None:
            num_media = torch.full((input_ids.shape[0],), visual_tokens.shape[1], dtype=torch.long)
    model.check_media_tokens(input_ids, num_media)
    return visual_tokens, num_media


def generation_config_for(model: Flamingo, **kwargs: Any) -> GenerationConfig:
    """The LM's generation config + Flamingo's conventions: stop at `<|endofchunk|>` or EOS, never emit `<image>`
    (nor, in beam search, a reference token), greedy unless asked otherwise. Any GenerationConfig field can be
    overridden by keyword."""
    base = getattr(model.lm, "generation_config", None)
    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    eos = [model.config.end_of_chunk_token_id]
    lm_eos = model.lm.config.eos_token_id
    eos += [lm_eos] if isinstance(lm_eos, int) else list(lm_eos or [])
    config.eos_token_id = list(dict.fromkeys(t for t in eos if t is not None))
    config.suppress_tokens = [model.config.media_token_id]
    config.do_sample = False
    config.temperature, config.top_k, config.top_p = 1.0, None, None  # neutral unless asked
    # so are the backbone's other decoding choices (a generation_config.json with num_beams 4 or min_p 0.05 would
    # make a plain call beam-search or filter): set to values that select nothing, not None, which transformers 5
    # fills from the LM's generation config (min_p 0 keeps every token)
    config.num_beams, config.num_return_sequences = 1, 1
    config.typical_p, config.epsilon_cutoff, config.eta_cutoff = 1.0, 0.0, 0.0
    if config.min_p is not None:
        config.min_p = 0.0
    # the backbone's chat-tuned penalties (Qwen2.5-Instruct ships repetition_penalty 1.05) are neutral too: a
    # Flamingo's few-shot answers repeat its demos' words, and the server's decode applies only what a request asks
    config.repetition_penalty, config.no_repeat_ngram_size, config.bad_words_ids = 1.0, 0, None
    # decoding modes `generate` refuses (several tokens a step; a prompt re-tokenized from its text) are off unless
    # asked: an LM's own generation_config.json may switch them on
    for name, off in (("prompt_lookup_num_tokens", None), ("assistant_early_exit", None), ("token_healing", False)):
        if hasattr(config, name):
            setattr(config, name, off)
    config.pad_token_id = pad_token_id(model, config.pad_token_id, config.eos_token_id)
    config.update(**kwargs)
    return with_flamingo_suppression(model, config)


def fields_set_in(config: GenerationConfig) -> dict[str, Any]:
    """The fields of `config` that differ from a bare `GenerationConfig()`'s: those its maker set (transformers' own
    test, `to_diff_dict`, in 4.x and 5.x alike), as copies of the values set (not their serialized form)."""
    return {key: copy.deepcopy(getattr(config, key)) for key in config.to_diff_dict()
            if not key.startswith("_") and key != "transformers_version" and hasattr(config, key)}


def check_chunked_prefill(config: GenerationConfig, attention_mask: Optional[torch.Tensor]) -> None:
    """What transformers' `prefill_chunk_size` needs from the installed version (docs/compat.md): 4.x gives a prompt's
    tokens their cache positions as position ids, counting a row's left padding, so a padded batch chunked decodes
    other tokens than one prefill (text-only prompts too): refused. 5.0 chunks only on a cache made before the
    prefill: `config` gets the dynamic cache it would make itself from 5.1 on."""
    if TRANSFORMERS < (5, 0) and attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"prefill_chunk_size with a left-padded batch needs transformers >= 5 (installed: "
                         f"{TRANSFORMERS_VERSION}: its chunks count a row's padding in the positions); prefill the "
                         "batch whole, or its prompts one by one")
    if TRANSFORMERS == (5, 0) and config.cache_implementation is None:
        config.cache_implementation = "dynamic"


def flamingo_token_ids(model: Flamingo) -> set[int]:
    """The ids that mean something to the cross-attention: `<image>`, `<|endofchunk|>` and the reference tokens."""
    ids = {model.config.media_token_id, model.config.end_of_chunk_token_id}
    if model.references is not None:
        first, n = model.references
        ids |= set(range(first, first + n))
    return {i for i in ids if i is not None}


def pad_token_id(model: Flamingo, lm_pad: Optional[int], eos: Sequence[int]) -> int:
    """The id generation pads with (finished rows of a batch) and reads a prompt's padding off when no attention mask
    is given: the LM's own generation pad id, else the tokenizer's recorded when the model was built
    (`FlamingoConfig.pad_token_id`; for configs saved before it was, the last added token before the references,
    which is `<PAD>` when the build added one), else the LM's EOS; never one of `flamingo_token_ids`, which a
    padded row would then read as an image (or a prompt's leading `<image>` as padding)."""
    special = flamingo_token_ids(model)
    recorded, c = model.config.pad_token_id, model.config
    if recorded is None and c.num_new_tokens:  # saved before it was recorded: `<PAD>` if the build added one
        recorded = c.first_new_token_id + c.num_new_tokens - 1 - c.num_image_references  # the last before references
    for candidate in (lm_pad, recorded, *eos):
        if candidate is not None and candidate not in special:
            return candidate
    return eos[0]  # an LM with no EOS of its own: `<|endofchunk|>`


def with_flamingo_suppression(model: Flamingo, config: GenerationConfig) -> GenerationConfig:
    """`config` with the suppressions every Flamingo generation needs, whoever built the config (ours, or a caller's
    `generation_config`): `<image>` never generated (a new image cannot come from the text), and in beam search no
    reference token either (a beam's rows are reordered each step, and a row's image, which a generated reference
    would change, is not: beams keep their prompt's images)."""
    extra = [model.config.media_token_id]
    if model.references is not None and (config.num_beams or 1) > 1:
        first, n = model.references
        extra += list(range(first, first + n))
    config.suppress_tokens = list(dict.fromkeys([*(config.suppress_tokens or []), *extra]))
    return config


def fit_to_positions(model: Flamingo, config: GenerationConfig, attention_mask: torch.Tensor) -> GenerationConfig:
    """`config` with at most as many new tokens as the LM has positions left after the longest prompt (a copy, and
    a logged warning, when it asked for more); a prompt that leaves none is a clear error. Without this an LM with
    learned positions (GPT-2, OPT) or an ALiBi table (MPT) fails deep inside torch at the first position past it."""
    limit = lm_max_positions(model.lm)
    if limit is None:
        return config
    prompt = int(attention_mask.sum(dim=1).max())  # positions of the longest prompt (left padding takes none)
    if prompt >= limit:
        raise ValueError(f"the prompt takes {prompt} positions and the LM has {limit}: none is left to generate "
                         "into; shorten the prompt")
    room = limit - prompt
    new = config.max_new_tokens if config.max_new_tokens is not None else HF_DEFAULT_NEW_TOKENS \
        if config.max_length is None else config.max_length - attention_mask.shape[1]
    if new <= room:
        return config
    log.warning("max_new_tokens=%d capped to %d: the prompt takes %d of the LM's %d positions",
                new, room, prompt, limit)
    config = copy.deepcopy(config)
    config.max_new_tokens = room
    if config.min_new_tokens is not None:
        config.min_new_tokens = min(config.min_new_tokens, room)
    return config


HF_DEFAULT_NEW_TOKENS = 20  # what transformers 5 generates when a config sets neither max_new_tokens nor max_length


def compile_config(device_type: str = "cpu", backend: Any = "inductor", fullgraph: bool = True) -> CompileConfig:
    """How `generate(compile=True)` compiles the decode step: one graph (`fullgraph`: the xattn hooks read only
    tensors prepared in prefill, so nothing breaks the graph), CUDA graphs on GPU ("reduce-overhead"), on every
    device. The graph does not depend on the prompt's length or number of images, nor on the batch's rows past the
    first size (a batch of one row and one of more compile one graph each; a text-only prompt, which skips the
    cross-attention, compiles its own)."""
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
    config = CompileConfig(fullgraph=fullgraph, backend=backend, mode=mode)
    config._compile_all_devices = True  # HF's switch (no constructor argument) to compile on CPU as well
    return config


_DROPOUT_TOLD: set[str] = set()  # the calls ("generate", "score") warned about active dropout, once each


def _active_dropout(model: Flamingo) -> list[str]:
    """The modules of a model in training mode that apply dropout (an `nn.Dropout` or a float rate such as HF
    attention's `attention_dropout`, above 0)."""
    if not model.training:
        return []
    # a frozen LM's decoder layers in training mode under activation checkpointing run in eval in every call but
    # a forward with gradients (`Flamingo.conditioned`)
    layers = model.decoder_layers_path
    flagged = {f"lm.{layers}.{i}" for i in range(len(model.lm.get_submodule(layers)))} if model.config.freeze_lm \
        else set()
    active = []
    for name, module in model.named_modules():
        if not module.training or name in flagged:
            continue
        rates = [module.p] if isinstance(module, torch.nn.modules.dropout._DropoutNd) else \
            [getattr(module, key) for key in ("attention_dropout", "dropout") if isinstance(getattr(module, key, None),
                                                                                          float)]
        if any(rate > 0 for rate in rates):
            active.append(name)
    return active


def _warn_if_random(model: Flamingo, call: str) -> None:
    """A model in training mode (as `from_backbones` builds one) draws its dropout in `call`: say so, once."""
    if call in _DROPOUT_TOLD:
        return
    active = _active_dropout(model)
    if active:
        _DROPOUT_TOLD.add(call)
        warn_outside(f"{call} on a model in training mode: its dropout ({', '.join(active[:3])}"
                     f"{', ...' if len(active) > 3 else ''}) makes the results random; call model.eval() first",
                     also=(os.path.dirname(torch.__file__),))  # past no_grad's wrapper too


@torch.no_grad()
def generate(model: Flamingo, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             images: Optional[torch.Tensor] = None, num_media: Optional[torch.Tensor] = None,
             num_frames: Optional[torch.Tensor] = None, *, visual_tokens: Optional[torch.Tensor] = None,
             generation_config: Optional[GenerationConfig] = None, streamer: Any = None, compile: bool = False,
             xattn_impl: XAttnImpl = "auto", vision_cache: Optional[VisionFeatureCache] = None,
             **kwargs: Any) -> torch.Tensor:
    """Prompt ids (B, T) (left-padded for batches) + media -> (B·num_return_sequences, T + new) token ids.

    kwargs are GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p, num_beams,
    repetition_penalty, num_return_sequences, ...) or HF `generate` arguments (logits_processor, ...). Sampling
    with one beam divides the logits by the temperature as the server does (`tempered_logits`): a tiny temperature
    tends to greedy, never to NaN probabilities. Its `output_scores` are then shifted by each row's max (the same
    distribution: `compute_transition_scores(..., normalize_logits=True)` reads the same log-probabilities; raw
    scores differ from transformers' by that shift). Beam sampling below `BEAM_SAMPLING_MIN_TEMPERATURE` (1e-4) is
    beam search, its limit (just above it transformers' beam sampling may return arbitrary further sequences: see
    the constant). repetition_penalty: finite and at least `MIN_REPETITION_PENALTY` (1e-4), else a
    ValueError.
    compile: decode with a static LM cache and the decode step under `torch.compile` (`compile_config()`), on any
    device (HF compiles by itself only on accelerators, and only with a static cache). The first call compiles.
    generation_config: a caller's config; the fields it sets override Flamingo's defaults (`generation_config_for`:
    stop at `<|endofchunk|>`, greedy, the backbone's penalties neutral), those it leaves unset keep them.
    xattn_impl: the prefill's cross-attention implementation (`masked_cross_attention`); all compute the same.
    vision_cache: the frozen tower's features of frames seen in earlier calls (`VisionFeatureCache`), e.g. the demo
    images an evaluation shows with many queries.
    """
    _check_inputs(model, input_ids, attention_mask, images, num_media, num_frames, visual_tokens)
    _warn_if_random(model, "generate")
    attention_mask = prompt_mask(model, input_ids, attention_mask, "generate")
    model.check_left_padding(attention_mask, "generate with a left-padded batch")
    visual_tokens, num_media = _media_for(model, input_ids, images, num_media, num_frames, visual_tokens, vision_cache)
    if compile:
        if not getattr(type(model.lm), "_can_compile_fullgraph", False):  # transformers' flag for a static cache
            raise ValueError(f"{type(model.lm).__name__} cannot decode with a static cache (transformers marks it not "
                             "compileable, MPT and MosaicGPT among them): generate without compile")
        kwargs.setdefault("cache_implementation", "static")
        kwargs.setdefault("compile_config", compile_config(input_ids.device.type))
    _drop_anothers_compiled_call(model.lm)  # transformers also compiles by itself (a static cache on a GPU)
    if kwargs.get("use_cache") is False or (generation_config is not None and generation_config.use_cache is False):
        raise ValueError("Flamingo decodes on the LM's KV cache (a step feeds only the new tokens): generate with "
                         "use_cache=True")
    if given := [name for name in CACHE_NAMES if kwargs.get(name) is not None]:  # its tail's images would count
        # from 0: another image, or none
        raise ValueError(f"{given[0]}: generate prefills the whole prompt itself, and the media index of a prompt "
                         "whose first tokens are cached would count its images from the cached part's end; generate "
                         "without it (the server's prefix cache reuses prompts that begin alike)")
    config_keys = set(GenerationConfig().to_dict())
    fields = {k: v for k, v in kwargs.items() if k in config_keys}
    # a caller's config overrides Flamingo's defaults where it was set (as transformers fills the fields a given
    # config leaves unset from the model's defaults, here the Flamingo's), and the keywords override both
    caller = {} if generation_config is None else fields_set_in(generation_config)
    config = generation_config_for(model, **{**caller, **fields})
    config = fit_to_positions(model, config, attention_mask)
    # the decoding modes a caller asked for, by keyword or in its config (the LM's own are off: generation_config_for)
    if assisted := [k for k in ASSISTED if kwargs.get(k) is not None or getattr(config, k, None) is not None]:
        raise ValueError(f"{', '.join(assisted)}: assisted and prompt-lookup decoding feed several tokens per decode "
                         "step, which Flamingo's decode step does not take: generate without them")
    if getattr(config, "token_healing", False):
        raise ValueError("token_healing: transformers re-tokenizes the prompt from its text without special tokens, "
                         "which drops every <image> and <|endofchunk|> (the answer would be the bare LM's): generate "
                         "without it")
    if config.guidance_scale not in (None, 1) or kwargs.get("negative_prompt_ids") is not None:
        raise ValueError("guidance_scale / negative_prompt_ids: classifier-free guidance runs a second LM call per "
                         "step inside generate, which would read this call's images and media index (a prompt ending "
                         "in <image> would see another image): generate without them")
    if config.prefill_chunk_size is not None and model.whole_prompt_rules:
        raise ValueError(f"{' and '.join(model.whole_prompt_rules)}: what a prompt's tokens compute depends on the "
                         "rest of it, so the prompt is prefilled whole: generate without prefill_chunk_size")
    if config.prefill_chunk_size is not None:
        check_chunked_prefill(config, attention_mask)
    if compile and (config.num_beams or 1) > 1:
        warnings.warn("generate(compile=True) with num_beams > 1: transformers' beam search does not run the compiled "
                      "decode step, so these beams decode eagerly (the same tokens)", stacklevel=2)
    rest = {k: v for k, v in kwargs.items() if k not in config_keys}
    ctx = MediaContext(Phase.PREFILL, visual_tokens, impl=xattn_impl)  # `<image>` is suppressed after the prompt
    processors = [*(rest.get("logits_processor") or []), EnterDecode(ctx, model)]
    check_repetition_penalty(config.repetition_penalty)
    if config.do_sample and (config.num_beams or 1) > 1 and isinstance(config.temperature, (int, float)) and \
            0 < config.temperature < BEAM_SAMPLING_MIN_TEMPERATURE:
        config.do_sample, config.temperature = False, 1.0  # the limit of beam sampling as the temperature tends to 0
    if config.do_sample and (config.num_beams or 1) == 1 and isinstance(config.temperature, (int, float)) and \
            0 < config.temperature < float("inf") and config.temperature != 1:
        # in place of transformers' warper, where it would run (the first of the sampling warpers, after the
        # custom processors): the same distribution, but no NaN at a tiny temperature (`tempered_logits`)
        processors.append(Temperature(float(config.temperature)))
        config.temperature = 1.0
    rest["logits_processor"] = LogitsProcessorList(processors)
    # On the KV cache whatever the LM's config says (MPT's: no cache, the whole sequence fed each step). transformers
    # 5 keeps every field set on the config; 4.x (from 4.50) replaces each field equal to GenerationConfig's default
    # with the model's (a chat LM's do_sample=True would undo greedy, its penalties the neutral ones) unless told
    # not to.
    config.use_cache = True
    if TRANSFORMERS < (5, 0):
        rest["use_model_defaults"] = False
    # the decode step reads the media context's tensors through the hooks' module, whose tensor attributes dynamo
    # would specialize (one graph per row count): their row dimension stays dynamic (EnterDecode marks it)
    with model.conditioned(ctx), _property_shapes_dynamic():
        return model.lm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 streamer=streamer, **rest)


def _drop_anothers_compiled_call(lm: Any) -> None:
    """transformers keeps an LM's compiled `__call__` on the LM (`_compiled_call`, reused while the compile config
    is equal). A deep copy of a model that has generated compiled holds the original LM's, whose decode steps would
    run the original's weights on the copy's cache: it is dropped, and the copy compiles its own."""
    compiled = lm.__dict__.get("_compiled_call")
    owner = getattr(getattr(compiled, "_torchdynamo_orig_callable", None), "__self__", None)
    if owner is not None and owner is not lm:
        lm.__dict__.pop("_compiled_call", None)
        lm.__dict__.pop("_last_compile_config", None)


_PATCHES = threading.local()


def _property_shapes_dynamic() -> Any:
    """dynamo's `force_nn_module_property_static_shapes=False`, one patch object per thread for all its calls: each
    `config.patch` holds its own ContextVar, which stays in the thread's context once set (a patch per call grew
    memory without end), and older torch keeps a patch's saved values on the object (not entered twice at once)."""
    patch = getattr(_PATCHES, "property_shapes", None)
    if patch is None:
        patch = _PATCHES.property_shapes = torch._dynamo.config.patch(force_nn_module_property_static_shapes=False)
    return patch


# transformers' `generate` arguments for assisted / prompt-lookup decoding (several tokens verified per step)
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "assistant_tokenizer")


# Beam sampling below this temperature is beam search, its limit as the temperature tends to 0. transformers' beam
# sampling keeps a beam's score as its summed log-probs / temperature and marks dropped beams with -1e9 on that scale:
# scores a smaller temperature pushes past -1e9 lose every beam (an empty answer at 1e-30; NaN probabilities at
# 1e-40). Above it transformers' own behaviour stays: each step draws 2 x num_beams candidates without replacement
# from one float32 softmax of those scores, so once fewer keep a non-zero probability (score gaps past about 100 x the
# temperature: on a tiny random LM from 3e-4 down), the rest are arbitrary, and with num_return_sequences > 1 such a
# candidate can come back as a further sequence (a sequences_score of -1e9). Beam search is the choice there.
BEAM_SAMPLING_MIN_TEMPERATURE = 1e-4

# The smallest repetition penalty taken. transformers divides a seen token's positive logit by the penalty: below
# about 1e-37 that overflows float32 to inf (NaN probabilities when sampling, an arbitrary inf token when greedy), and
# 1e-4 already multiplies such a logit by 10^4, which makes the likeliest seen token certain.
MIN_REPETITION_PENALTY = 1e-4


def check_repetition_penalty(penalty: Optional[float]) -> None:
    """A ValueError for a `repetition_penalty` that is not a number in [MIN_REPETITION_PENALTY, inf) (1.0: none)."""
    if penalty is None:
        return
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not \
            MIN_REPETITION_PENALTY <= penalty < float("inf"):
        raise ValueError(f"repetition_penalty={penalty!r}: it must be a number of at least {MIN_REPETITION_PENALTY:g} "
                         "and finite (1.0 penalises nothing, above 1 discourages repeating a token, below 1 "
                         "encourages it)")


def tempered_logits(logits: torch.Tensor, temperature: Union[float, torch.Tensor]) -> torch.Tensor:
    """logits (..., V) / temperature (a float, or a tensor broadcast to (..., 1)), shifted first to a max of 0 per
    row: the same softmax, and a tiny temperature sends every token but the likeliest (ties: each of them) to -inf,
    never the likeliest to inf / inf = NaN, so sampling tends to greedy as the temperature tends to 0. The temperature
    is kept at or above the smallest normal number of the logits' dtype (1e-300 is 0 in float32). The one rule of
    `generate(do_sample=True)` and the server's sampler."""
    tiny = torch.finfo(logits.dtype).tiny
    temperature = temperature.clamp(min=tiny) if isinstance(temperature, torch.Tensor) else max(temperature, tiny)
    return (logits - logits.max(dim=-1, keepdim=True).values) / temperature


class Temperature(LogitsProcessor):
    """transformers' temperature warper by `tempered_logits`, for multinomial sampling (one beam): its scores (the
    `output_scores` of such a call) are shifted by each row's max, which leaves the distribution as it was."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return tempered_logits(scores, self.temperature)


class EnterDecode(LogitsProcessor):
    """Switches a generation's context from PREFILL to DECODE when transformers hands over the prompt's logits:
    every later LM call of the generation decodes new tokens. At the switch it lists each block's decode K/V that
    PREFILL made (`MediaContext.decode_kv`, by block), so that a compiled decode step reads them by index and not
    by a key holding the row count, with the row dimension marked dynamic: one graph serves every batch size past
    the first (keyed, each new row count compiled its own, and fullgraph turned the ninth into an error). Leaves
    the scores as they are."""

    def __init__(self, ctx: MediaContext, model: Flamingo) -> None:
        self.ctx, self.blocks = ctx, len(model.xattn)
        self.kind = "all" if model.decodes_all_images else "last"

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.phase is not Phase.DECODE and (ctx.media_index is not None or ctx.decode_index is not None):
            rows = input_ids.shape[0]  # the prompt has run
            ctx.decode_kv = [ctx.media_kv.get((self.kind, i, rows)) for i in range(self.blocks)]
            # the row count is dynamic in a compiled step (automatic dynamic shapes do not reach these: the step
            # reads them through the hooks' module, whose tensors dynamo specializes)
            for t in ctx.decode_tensors():
                torch._dynamo.maybe_mark_dynamic(t, 0)
            ctx.phase = Phase.DECODE
        return scores


@torch.no_grad()
def score(model: Flamingo, input_ids: torch.Tensor, continuations: Sequence[Sequence[int]],
          attention_mask: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
          num_media: Optional[torch.Tensor] = None, num_frames: Optional[torch.Tensor] = None, *,
          visual_tokens: Optional[torch.Tensor] = None, batch_size: int = 64,
          vision_cache: Optional[VisionFeatureCache] = None) -> torch.Tensor:
    """Log-likelihood of each continuation (token id lists) after one shared context `input_ids (1, T)`.

    The context, its images and its caches are computed once; candidates run in batches of `batch_size` on a copy
    of the context's KV cache. Returns (C,) sums of token log-probs. `score_batch` does several contexts at once.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("score() takes one context (batch 1); score_batch() takes several")
    return score_batch(model, input_ids, [continuations], attention_mask, images, num_media, num_frames,
                       visual_tokens=visual_tokens, batch_size=batch_size, vision_cache=vision_cache)[0]


@torch.no_grad()
def score_batch(model: Flamingo, input_ids: torch.Tensor, continuations: Sequence[Sequence[Sequence[int]]],
                attention_mask: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
                num_media: Optional[torch.Tensor] = None, num_frames: Optional[torch.Tensor] = None, *,
                visual_tokens: Optional[torch.Tensor] = None, batch_size: int = 64,
                vision_cache: Optional[VisionFeatureCache] = None) -> list[torch.Tensor]:
    """Log-likelihoods of each context's own candidates, for B contexts in one batch.

    input_ids (B, T), left-padded (`attention_mask`); `continuations[b]` is context b's list of candidates (token id
    lists, any number per context). The contexts and their images run once, in one forward; then the (context,
    candidate) rows run in batches of `batch_size` rows, each row on its context's KV cache and media. Returns B
    tensors, (C_b,) summed token log-probs each: what `score` gives for each context alone, up to float rounding.
    vision_cache: as in `generate`.
    """
    _check_inputs(model, input_ids, attention_mask, images, num_media, num_frames, visual_tokens)
    _warn_if_random(model, "score")
    b = input_ids.shape[0]
    if len(continuations) != b:
        raise ValueError(f"{b} contexts but {len(continuations)} candidate lists")
    if any(len(c) == 0 for cands in continuations for c in cands):
        raise ValueError("every continuation needs at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    for cands in continuations:
        for c in cands:
            for k, t in enumerate(c):
                try:
                    t = operator.index(t)  # ints (Python, numpy, 0-d integer tensors); not 5.7, not "5"
                except TypeError:
                    raise ValueError(f"continuations hold {t!r}: token ids are integers") from None
                if not 0 <= t < vocab:
                    raise ValueError(f"continuations hold token id {t}, outside the LM's vocabulary [0, {vocab})")
                if t == model.config.media_token_id and k < len(c) - 1:  # it would need an image of its own
                    raise ValueError("a continuation may not hold <image> before its last token")
    attention_mask = prompt_mask(model, input_ids, attention_mask, "score_batch")
    model.check_left_padding(attention_mask, "score_batch with left-padded contexts")
    context_len = attention_mask.sum(dim=1)  # (B,)
    limit = lm_max_positions(model.lm)
    if limit is not None:
        # a candidate's last token is only scored, never fed: context + longest candidate - 1 positions
        needed = context_len.cpu() + torch.tensor([max((len(c) for c in cands), default=1) - 1
                                                   for cands in continuations])  # (B,)
        if bool((needed > limit).any()):
            i = int(needed.argmax())
            raise ValueError(f"context {i} and its longest continuation need {int(needed[i])} positions; the LM has "
                             f"{limit}")
        if input_ids.shape[1] + max((len(c) for cands in continuations for c in cands), default=1) - 1 > limit:
            # the padded batch would run past the LM's positions where each context alone fits (a learned table, an
            # ALiBi or causal-mask buffer of that many keys): each context scored alone, without its padding
            def row(x: Any, i: int) -> Any:
                return None if x is None else torch.as_tensor(x)[i:i + 1]

            return [score_batch(model, context, [continuations[i]], attention_mask=torch.ones_like(context),
                                images=row(images, i), num_media=row(num_media, i),
                                num_frames=row(num_frames, i), visual_tokens=row(visual_tokens, i),
                                batch_size=batch_size, vision_cache=vision_cache)[0]
                    for i, context in ((i, input_ids[i:i + 1, input_ids.shape[1] - int(context_len[i]):])
                                       for i in range(b))]
    visual_tokens, num_media = _media_for(model, input_ids, images, num_media, num_frames, visual_tokens, vision_cache)
    device = input_ids.device
    contexts = MediaContext(Phase.FORWARD, visual_tokens)
    with model.conditioned(contexts):
        # only the last position's logits are read: B x T x V of them would not fit for long prompts, large vocabs
        out = model.lm(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=model.position_ids_for(attention_mask), use_cache=True,
                       **lm_last_logits_only(model.lm))
    context_cache, first_logprobs = lm_output_cache(out), out.logits[:, -1].float().log_softmax(-1)  # (B, V)
    pairs = [(i, j) for i, cands in enumerate(continuations) for j in range(len(cands))]  # one row per candidate
    pad = generation_config_for(model).pad_token_id  # never `<image>` nor a reference token
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = torch.tensor([i for i, _ in chunk], device=device)  # (C,) each candidate's context
        seqs = [list(continuations[i][j]) for i, j in chunk]
        c, longest = len(seqs), max(len(x) for x in seqs)
        ids = torch.zeros(c, longest, dtype=torch.long, device=device)
        mask = torch.zeros(c, longest, dtype=torch.long, device=device)
        for k, x in enumerate(seqs):
            ids[k, : len(x)] = torch.tensor(x, device=device)
            mask[k, : len(x)] = 1
        total = first_logprobs[rows, ids[:, 0]]  # (C,)
        if longest > 1:
            cache = select_cache_rows(context_cache, rows)
            full_mask = torch.cat([attention_mask[rows], mask[:, :-1]], dim=1)
            positions = context_len[rows, None] + torch.arange(longest - 1, device=device)  # (C, L-1)
            # a short row's last token (and its padding) is fed too, its logits unread: feed the pad id there, since
            # a last `<image>` would ask for an image the context lacks, and a last reference would re-target
            fed = ids[:, :-1].masked_fill(mask[:, 1:] == 0, pad)  # (C, L-1)
            with model.conditioned(contexts.for_candidates(rows)):
                logits = model.lm(input_ids=fed, attention_mask=full_mask, position_ids=positions,
                                  use_cache=True, **{lm_cache_argument(model.lm): cache}).logits  # (C, L-1, V)
            logprobs = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (C, L-1)
            total = total + (logprobs * mask[:, 1:]).sum(dim=1)
        scores.append(total)
    flat = torch.cat(scores) if scores else torch.zeros(0)
    return list(flat.split([len(cands) for cands in continuations]))

