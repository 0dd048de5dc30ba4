"""`Flamingo`: a frozen HF vision tower + Perceiver Resampler + a frozen HF causal LM with GATED XATTN-DENSE blocks.

How the blocks get into the LM (see docs/architecture.md): the LM stays an unmodified HF model (its class, module
tree, state-dict keys, `generate` and caches). Permanent forward hooks connect it to our modules:
- a pre-hook on each chosen decoder layer replaces its hidden-states argument by `block(hidden, ...)`;
- a hook on the input embedding puts the rows of the added tokens (`<image>`, `<|endofchunk|>`, pad) from our own
  small trainable table, and derives each token's media index from the input ids it sees;
- a hook on the output head fills the logits of the added tokens from our own rows (untied heads) or the input
  rows (tied heads), so `<|endofchunk|>` can be predicted while the LM's tables stay frozen;
- a pre-hook on the output head, for a loss computed in chunks (`forward(loss_chunks=...)`), keeps the head's
  input and hands the head no tokens, so the (B, T, V) logits are never made whole (chunked_loss.py).
Per-call conditioning (visual tokens, their K/V per block, media indices) and the call's phase (forward, prefill,
decode, score) live in a `MediaContext` (context.py) that exists for the duration of one call only
(`Flamingo.conditioned`, cleared in `finally`). Outside a call every hook is a no-op: `model.lm` is the bare LM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from ..config import BACKBONE_DIRS, CONFIG_NAME, PROCESSOR_FILES, TRAIN_CONFIG_NAME, WEIGHTS_NAME, FlamingoConfig
from ..runtime.checkpoint_io import atomic_directory, check_apart, check_named, foreign_entries
from ..runtime.compat import (
    CACHE_NAMES,
    TRANSFORMERS_VERSION,
    checkpoint_leaves_pre_hooks_out,
    dtype_kwargs,
    lm_output_cache,
    lm_takes_position_ids,
)
from ..runtime.hub import hub_commit, is_hub_reference, local_dir, local_or_hub, metadata_dir, snapshot_commit
from ..runtime.meta import meta_parameters
from . import generation, lora, quantize
from .backbones import (
    find_decoder_layers,
    hidden_size_of,
    lm_max_positions,
    lm_text_config,
    load_lm,
    load_vision_tower,
    recorded_dtype,
    vision_features,
    vision_hidden_size,
)
from .card import CARD_NAME, edited_card, model_card
from .cast import to_dtype
from .chunked_loss import chunked_cross_entropy, whole_logits_cross_entropy
from .context import MediaContext, Phase
from .feature_cache import VisionFeatureCache
from .idefics_block import IdeficsCrossAttentionBlock
from .resampler import MLPResampler, PerceiverResampler
from .xattn import (
    GatedCrossAttentionBlock,
    XAttnImpl,
    choose_impl,
    compute_media_index,
    document_positions,
    document_starts,
    next_image_index,
)

BACKBONE_PREFIXES = ("vision.", "lm.")
# what `save_pretrained` writes (the trainer adds its run's config to its final model) and the processor's files: the
# entries a save may replace in a directory it writes again
SAVED_ENTRIES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, *BACKBONE_DIRS, TRAIN_CONFIG_NAME)
# the strings `torch_dtype=` takes besides a torch.dtype (as transformers' `from_pretrained` does)
DTYPE_STRINGS = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "auto": None}
log = logging.getLogger(__name__)
# The contexts of the Flamingo calls running on each thread, by model (`Flamingo.conditioned`): per thread, so calls
# from several threads neither refuse nor read each other's, and an LM call made outside a call of its own thread (the
# bare `model.lm`, the one-time LM probes) stays the bare LM while another thread is inside one. Not on the module:
# a model is copied and pickled with no thread state.
_CALLS = threading.local()
# Held by every call of a model in training mode under activation checkpointing with a frozen LM, whose decoder
# layers carry a training flag only for HF to checkpoint them and have it switched off while they compute
# (`Flamingo._layers_run_in_eval`), and by `Flamingo.train`: the flags are shared by every thread, so such calls run
# one at a time and a mode change waits for them. Module-level for the same reason as `_CALLS`; reentrant: a
# checkpointed layer's forward and recompute nest inside a call.
_LAYER_FLAGS = threading.RLock()


@dataclass
class FlamingoOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None  # the mean over the labelled tokens
    logits: Optional[torch.Tensor] = None
    cache: Any = None  # the LM's KV cache; named as transformers >= 5.24 names it (`past_key_values` still reads it)
    visual_tokens: Optional[torch.Tensor] = None
    loss_tokens: Optional[torch.Tensor] = None  # () how many tokens the loss is the mean over (to weigh batches)
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None  # the LM's, with output_hidden_states=True
    attentions: Optional[tuple[torch.Tensor, ...]] = None  # the LM's, with output_attentions=True

    @property
    def past_key_values(self) -> Any:
        """The LM's KV cache under its older name (transformers < 5.24 outputs call it so)."""
        return self.cache


class Flamingo(nn.Module):
    def __init__(self, vision: nn.Module, lm: nn.Module, config: FlamingoConfig, *,
                 resampler_and_blocks_on_meta: bool = False) -> None:
        """resampler_and_blocks_on_meta: build those with their parameters on the meta device (no memory, no random
        init), for a caller that assigns every one of them (a conversion: `load_state_dict(..., assign=True)`)."""
        super().__init__()
        if any(isinstance(getattr(hook, "__self__", None), Flamingo)
               for hook in lm.get_input_embeddings()._forward_hooks.values()):
            # hooks cannot be shared: two models would run each other's blocks, and the first could never be freed
            raise ValueError("this LM already belongs to a Flamingo model (its hooks are on it; from_backbones also "
                             "resized its embedding table and added tokens to the tokenizer it was given): load the LM "
                             "and its tokenizer again for another model")
        self.config = config
        self.vision = vision
        self.lm = lm
        # the directory or Hub name `from_pretrained` loaded it from (None for a model built here), as HF's
        # `name_or_path`: what an evaluation names the model by (eval/runner.py); not saved
        self.name_or_path: Optional[str] = None
        self._activation_checkpointing = False

        self.decoder_layers_path = find_decoder_layers(lm)
        layers = lm.get_submodule(self.decoder_layers_path)
        self.xattn_layer_indices = config.xattn_layer_indices(len(layers))
        if not self.xattn_layer_indices:  # the images could never reach the text
            raise ValueError(f"xattn_every={config.xattn_every} places no cross-attention block in this "
                             f"{len(layers)}-layer LM (a block goes before layer i when (i + 1) % xattn_every == 0)"
                             if config.xattn_layers is None else "xattn_layers is empty: no cross-attention block")
        dim, dim_visual = hidden_size_of(lm_text_config(lm)), vision_hidden_size(vision)
        tower_layers = getattr(getattr(vision, "config", None), "num_hidden_layers", None)
        if isinstance(tower_layers, int) and not -tower_layers - 1 <= config.vision_feature_layer <= tower_layers:
            raise ValueError(f"vision_feature_layer={config.vision_feature_layer} is outside the vision tower's "
                             f"{tower_layers + 1} hidden states (embeddings + {tower_layers} layers): use -1 (its "
                             f"output) or an index in [-{tower_layers + 1}, {tower_layers}]")

        with meta_parameters() if resampler_and_blocks_on_meta else nullcontext():
            if config.resampler == "perceiver":
                self.resampler: nn.Module = PerceiverResampler(
                    dim=dim_visual, depth=config.resampler_depth, num_latents=config.num_latents,
                    heads=config.resampler_heads, head_dim=config.resampler_head_dim, ffw_mult=config.ffw_mult,
                    max_frames=config.max_frames, qk_norm=config.resampler_qk_norm,
                    ffw_act=config.resampler_ffw_act)
            else:
                self.resampler = MLPResampler(dim=dim_visual, num_latents=config.num_latents,
                                              ffw_mult=config.ffw_mult, max_frames=config.max_frames)
            self.xattn = nn.ModuleList(self._make_block(dim, dim_visual) for _ in self.xattn_layer_indices)
        self._init_new_token_rows()
        param = next(lm.parameters())
        if not resampler_and_blocks_on_meta:
            self.resampler.to(device=param.device)
            self.xattn.to(device=param.device)

        # (first id, count) of the `<imageK>` reference tokens, or None (references.py)
        self.references: Optional[tuple[int, int]] = None
        if config.num_image_references:
            if config.first_reference_token_id is None:
                raise ValueError("config.num_image_references > 0 needs config.first_reference_token_id")
            self.references = (config.first_reference_token_id, config.num_image_references)
        # the LM changes below (its hooks last: a model whose constructor failed leaves the LM unowned)
        self.vision.requires_grad_(not config.freeze_vision)
        self.lm.requires_grad_(not config.freeze_lm)
        if config.lm_lora is not None:  # adapters injected in place (model/lora.py): only they train in the LM
            lora.apply_lora(self.lm, config.lm_lora, new=False)  # a new model's names: from_backbones checks them
        for j, i in enumerate(self.xattn_layer_indices):
            layers[i].register_forward_pre_hook(partial(self._layer_pre_hook, j), with_kwargs=True)
        self.lm.get_input_embeddings().register_forward_hook(self._embedding_hook)
        head = self.lm.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(self._head_pre_hook)
            if config.num_new_tokens:
                head.register_forward_hook(self._output_hook)
        self._lm_takes_position_ids = lm_takes_position_ids(lm)
        # Decoding keeps every image's K/V per row (not only the last) when a row's image can change after its
        # prompt (references) or every earlier image is seen (read by generation and the server's prefill too).
        self.decodes_all_images = self.references is not None or not config.only_attend_last_image
        # ... or no image at all (OpenFlamingo v1's rule: generated text follows the last image): no decode K/V made
        self.decodes_no_image = config.attend_next_image
        # The rules under which what a prompt's early tokens compute depends on what comes later in it (a text token
        # sees the next image; a row skips the blocks if it holds no image): such prompts are prefilled whole, or in
        # chunks that know the row's image count, and their blocks are never reused for another prompt.
        self.whole_prompt_rules = [name for name in ("attend_next_image", "imageless_rows_skip_blocks")
                                   if getattr(config, name)]
        self._packs_exactly: Optional[bool] = None  # whether the LM keeps packed samples apart (probed on first use)
        self._head_is_last: Optional[bool] = None  # whether the LM returns its head's output as is (probed likewise)
        self._pads_exactly: Optional[bool] = None  # whether a left-padded prompt == the prompt alone (likewise)

    def _make_block(self, dim: int, dim_visual: int) -> nn.Module:
        """One cross-attention block of the configured variant: the paper's (default) or IDEFICS's."""
        cfg = self.config
        common = dict(dim=dim, dim_visual=dim_visual, heads=cfg.xattn_heads, head_dim=cfg.xattn_head_dim,
                      gated=cfg.gated, only_attend_last_image=cfg.only_attend_last_image, gate_type=cfg.gate_type)
        if cfg.block == "idefics":
            return IdeficsCrossAttentionBlock(ffw_dim=cfg.xattn_ffw_dim, eps=cfg.xattn_norm_eps,
                                              qk_norm=cfg.xattn_qk_norm, **common)
        return GatedCrossAttentionBlock(ffw_mult=cfg.ffw_mult, **common)

    # ------------------------------------------------------------------------------------------ added tokens
    def _init_new_token_rows(self) -> None:
        """Own trainable rows for the added tokens; the LM's tables (resized to hold them) stay frozen. The rows are
        made in the default dtype, as the resampler and blocks are (a half-precision LM's rows would train in half
        precision); the hooks cast them to the LM's activations' dtype where they are used."""
        cfg, n = self.config, self.config.num_new_tokens
        self.new_token_embeddings: Optional[nn.Parameter] = None
        self.new_lm_head: Optional[nn.Parameter] = None
        self.new_lm_head_bias: Optional[nn.Parameter] = None
        if n == 0:
            return
        if cfg.first_new_token_id is None:
            raise ValueError("config.num_new_tokens > 0 needs config.first_new_token_id")
        end = cfg.first_new_token_id + n
        if self.lm.get_input_embeddings().num_embeddings < end:
            self.lm.resize_token_embeddings(end, mean_resizing=False)
        dtype = torch.get_default_dtype()
        in_rows = self.lm.get_input_embeddings().weight[cfg.first_new_token_id:end]
        self.new_token_embeddings = nn.Parameter(in_rows.detach().to(dtype, copy=True))
        head = self.lm.get_output_embeddings()
        if head is not None and head.weight is not self.lm.get_input_embeddings().weight:
            self.new_lm_head = nn.Parameter(head.weight[cfg.first_new_token_id:end].detach().to(dtype, copy=True))
            if getattr(head, "bias", None) is not None:
                self.new_lm_head_bias = nn.Parameter(head.bias[cfg.first_new_token_id:end].detach().to(dtype,
                                                                                                     copy=True))

    def _embedding_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ctx = self._media_context
        if ctx is None:  # outside a Flamingo call: the bare LM's embedding
            return output
        input_ids = args[0]  # (B, T)
        if ctx.phase is Phase.DECODE:  # reads what PREFILL prepared; a generated reference re-targets its row
            if self.references is not None and ctx.decode_index is not None:
                first, n = self.references
                k = input_ids[:, -1:] - first  # (rows, 1): decode steps feed one token a row
                switch = (k >= 0) & (k < n) & (k < ctx.decode_count)
                ctx.decode_index.copy_(torch.where(switch, k + 1, ctx.decode_index))
        else:
            start = ctx.last_media_index
            if start is not None and start.shape[0] != input_ids.shape[0]:
                raise RuntimeError(f"LM call with {input_ids.shape[0]} rows after one with {start.shape[0]}")
            count = compute_media_index(input_ids, self.config.media_token_id, start, ctx.document_ids,
                                        references=self.references, start_count=ctx.media_count)
            ctx.last_media_index = count[:, -1]  # where the next call of these rows counts on from
            ctx.media_index = count if not self.config.attend_next_image else \
                next_image_index(count, input_ids == self.config.media_token_id, ctx.row_images)
            if self.references is not None:
                images = (input_ids == self.config.media_token_id).sum(dim=1)  # (rows,)
                ctx.media_count = images if ctx.media_count is None else ctx.media_count + images
            if self.config.imageless_rows_skip_blocks:  # (rows,): no image in the whole row
                ctx.skip_rows = (count[:, -1] if ctx.row_images is None else ctx.row_images.to(count.device)) == 0
            if ctx.phase is Phase.PREFILL:  # made here, eagerly, so that compiled decode steps only read them
                if self.decodes_all_images:  # (rows, 1): the image each row sees
                    ctx.decode_index = ctx.last_media_index.clone()[:, None]
                    ctx.decode_count = None if ctx.media_count is None else ctx.media_count.clone()[:, None]
                elif self.config.attend_next_image:  # (rows, 1): generated text follows the last image: none
                    ctx.decode_index = torch.zeros_like(ctx.last_media_index)[:, None]
                else:  # (rows, 1): 1 = has an image
                    ctx.decode_index = (ctx.last_media_index > 0).long()[:, None]
                if ctx.skip_rows is not None:  # (rows, 1): -1 = skips the blocks
                    ctx.decode_index = torch.where(ctx.skip_rows[:, None], -1, ctx.decode_index)
        if self.new_token_embeddings is None:
            return output
        first, n = self.config.first_new_token_id, self.config.num_new_tokens
        offset = input_ids - first
        is_new = (offset >= 0) & (offset < n)  # (B, T)
        rows = F.embedding(offset.clamp(0, n - 1), self.new_token_embeddings).to(output.dtype)  # (B, T, D)
        scale = getattr(module, "embed_scale", None)  # an embedding that scales its output (Gemma's in transformers 5)
        if scale is not None:
            rows = rows * (scale.to(output.dtype) if torch.is_tensor(scale) else scale)
        return torch.where(is_new[..., None], rows, output)

    def _head_pre_hook(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        ctx = self._media_context
        if ctx is None or not ctx.defer_head or ctx.head_input is not None:
            return None
        ctx.head_input = args[0]  # (B, T, D)
        return (args[0][..., :0, :],) + tuple(args[1:])  # the LM's own logits: (B, 0, V)

    def _output_hook(self, module: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
        ctx = self._media_context
        if ctx is None or ctx.defer_head:  # outside a Flamingo call (the bare LM's head), or a chunked loss's
            return logits
        return self._write_new_logits(args[0], logits)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (n, D) -> the logits (n, V) of a Flamingo call, added tokens included; the same with or without a
        media context (a chunked loss calls it again in backward, after the call's context is gone)."""
        logits = self.lm.get_output_embeddings()(hidden)
        return logits if not self.config.num_new_tokens else self._write_new_logits(hidden, logits)

    def _write_new_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Fill the added tokens' columns of the head's fresh output `logits (..., V)` from our rows and `hidden`."""
        weight = self.new_lm_head if self.new_lm_head is not None else self.new_token_embeddings
        first, n = self.config.first_new_token_id, self.config.num_new_tokens
        new_logits = F.linear(hidden, weight.to(hidden.dtype),
                              None if self.new_lm_head_bias is None else self.new_lm_head_bias.to(hidden.dtype))
        # written into the head's fresh output: a cat would copy the (B, T, V) logits, and its backward would build
        # a zero-filled gradient per slice
        logits[..., first:first + n] = new_logits
        return logits

    # ------------------------------------------------------------------------------------------ conditioning
    @property
    def _media_context(self) -> Optional[MediaContext]:
        """The context of this model's call running on the current thread (`conditioned`); None outside one."""
        return getattr(_CALLS, "contexts", {}).get(id(self))

    @contextmanager
    def conditioned(self, ctx: MediaContext) -> Iterator[MediaContext]:
        """Make `ctx` the conditioning of every LM call inside the block on this thread; always cleared afterwards.
        Calls on other threads (an app's worker pool) have their own and never see this one: each thread's LM calls
        outside a call of its own are the bare LM's."""
        contexts = getattr(_CALLS, "contexts", None)
        if contexts is None:
            contexts = _CALLS.contexts = {}
        if id(self) in contexts:
            raise RuntimeError("Flamingo calls cannot be nested: this thread is already inside a call of this model")
        contexts[id(self)] = ctx
        # a frozen LM's decoder layers carry a training flag only so that HF checkpoints them in a training forward
        # (`train`); transformers checkpoints nothing without gradients, so any other call (generate, score, a
        # forward without gradients) runs them in eval, else a layer that reads its own flag (OPT's, Falcon's
        # dropout) would apply its dropout
        flagged = self.training and self._activation_checkpointing and self.config.freeze_lm  # (else none is)
        training_forward = getattr(ctx, "phase", None) is Phase.FORWARD and torch.is_grad_enabled()
        try:
            # the flags are shared by threads: a call on such a model holds them for its whole length, so that
            # another thread's call cannot switch them under it (HF decides each layer's checkpointing from them)
            with _LAYER_FLAGS if flagged else nullcontext():
                with self._layers_run_in_eval() if flagged and not training_forward else nullcontext():
                    yield ctx
        finally:
            del contexts[id(self)]

    def _layer_pre_hook(self, block_idx: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._media_context is None:  # outside a Flamingo call: the bare LM's layer
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
        lm_dtype = hidden.dtype
        # the block computes in its own dtype: float32 blocks beside a half-precision LM (in-memory backbones given
        # to `from_backbones`, `train.frozen_dtype`) run outside autocast too; a no-op when they agree
        hidden = hidden.to(next(self.xattn[block_idx].parameters()).dtype)
        if (self._activation_checkpointing and module.training and torch.is_grad_enabled()
                and checkpoint_leaves_pre_hooks_out(module)):
            # The layer's checkpoint leaves this hook out, so the block gets its own: recomputed in backward as the
            # layer is, under the call's conditioning re-installed (`_checkpoint_contexts`: fresh memos, so the
            # recompute projects the block's visual K/V again instead of keeping them)
            hidden = torch.utils.checkpoint.checkpoint(partial(self._run_block, block_idx), hidden,
                                                       use_reentrant=False, context_fn=self._checkpoint_contexts)
        else:
            hidden = self._run_block(block_idx, hidden)
        # The LM's layer gets the activations in its own dtype: an fp32 block's output is fp32, which a
        # half-precision LM's norms refuse (CPU autocast leaves `layer_norm` to them). A no-op when they agree.
        hidden = hidden.to(lm_dtype)
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _run_block(self, block_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `block_idx` on the hidden states (B, T, D) entering its decoder layer, under the current call's
        media context (read here, not captured: a checkpoint's recompute runs under its own)."""
        ctx = self._media_context
        block = self.xattn[block_idx]
        skip = self.config.imageless_rows_skip_blocks
        if ctx.phase is Phase.DECODE:  # reads only tensors made in PREFILL: a compiled decode step does not depend
            # on (or, keeping only the last image, recompile for) the prompt's number of images
            # each block's K/V by index (`decode_kv`: listed by generate's switch to DECODE, or by the server's batch)
            kv = ctx.decode_kv[block_idx] if ctx.decode_kv else None
            rows_index = None if ctx.decode_index is None else \
                ctx.decode_index.expand(hidden.shape[0], hidden.shape[1])  # (rows, T); -1: skips the block
            index = None if kv is None else rows_index.clamp(min=0) if skip else rows_index
            impl = "gather" if self.decodes_all_images and self.config.only_attend_last_image else "reference"
            out = block(hidden, kv, index, impl)
            hidden = torch.where((rows_index < 0)[..., None], hidden, out) if skip else out
        elif ctx.visual is None:  # text only: the attention term is exactly zero
            if not skip:  # (with imageless_rows_skip_blocks, no row runs the block)
                hidden = block(hidden, None, None)
        else:
            if ctx.media_index is None or ctx.media_index.shape != hidden.shape[:2]:
                raise RuntimeError("media index unknown for this LM call: Flamingo needs `input_ids` (not "
                                   "`inputs_embeds`) so that it can see the <image> tokens")
            if ctx.phase is Phase.SCORE and not self.decodes_all_images and not self.decodes_no_image:
                # candidates feed no <image> (score_batch refuses one before the last token, and never feeds the
                # last): each token sees its context's last image, so that one image's K/V is all a row needs
                kv = ctx.candidates_last_image_kv(block_idx, block)  # (C, 1, R, h, d)
                out = block(hidden, kv, (ctx.media_index > 0).long(), "reference")
                return torch.where(ctx.skip_rows[:, None, None], hidden, out) if skip else out
            kv = ctx.kv_for(block_idx, block, hidden.shape[0])  # (B, N, R, h, d)
            only_last = self.config.only_attend_last_image
            impl = choose_impl(ctx.impl, hidden.shape[1], kv.k.shape[1], only_last, hidden.device)
            mask = ctx.flex_mask(kv.k.shape[1], kv.k.shape[2], only_last) if impl == "flex" else None
            out = block(hidden, kv, ctx.media_index, impl, mask)
            hidden = torch.where(ctx.skip_rows[:, None, None], hidden, out) if skip else out
            if ctx.phase is Phase.PREFILL and self.decodes_all_images:  # for the decode steps, made eagerly
                ctx.media_kv[("all", block_idx, hidden.shape[0])] = kv
            elif ctx.phase is Phase.PREFILL and not self.decodes_no_image:
                ctx.last_image_kv_for(block_idx, block, hidden.shape[0])
        return hidden

    # ------------------------------------------------------------------------------------------ vision
    def encode_media(self, images: torch.Tensor, num_media: Optional[torch.Tensor] = None,
                     num_frames: Optional[torch.Tensor] = None,
                     vision_cache: Optional[VisionFeatureCache] = None) -> torch.Tensor:
        """images (B, N, F, C, H, W) -> visual tokens (B, N, R, Dv) in `visual_dtype`. Only real media and frames
        reach the tower (only those not in `vision_cache`, when given: the tower must be frozen)."""
        if images.ndim == 5:  # (B, N, C, H, W): stills
            images = images[:, :, None]
        if images.ndim != 6:
            raise ValueError(f"images must be (B, N_media, F, C, H, W), got shape {tuple(images.shape)}")
        if not images.dtype.is_floating_point:  # raw 0..255 bytes would reach the tower unnormalised
            raise ValueError(f"images must be pixel values (floats, normalised as the processor makes them), got "
                             f"{images.dtype}: pass the images through the processor")
        b, n, f = images.shape[:3]
        device = images.device
        # The masks live where `num_media` / `num_frames` do: built from the CPU copies a data loader makes, they
        # select real media and frames without a host sync on the accelerator (index_select, not boolean masks).
        mask_device = num_media.device if isinstance(num_media, torch.Tensor) else torch.device("cpu")
        media_mask = torch.ones(b, n, dtype=torch.bool, device=mask_device)
        if num_media is not None:
            media_mask = torch.arange(n, device=mask_device) < torch.as_tensor(num_media, device=mask_device)[:, None]
        frame_mask = media_mask[:, :, None].expand(b, n, f)  # (B, N, F)
        if num_frames is not None:
            num_frames = torch.as_tensor(num_frames, device=mask_device)
            frame_mask = frame_mask & (torch.arange(f, device=mask_device) < num_frames[:, :, None])
            if bool((num_frames[media_mask] < 1).any()):
                raise ValueError("every real medium needs at least one frame (num_frames >= 1)")
        frame_rows = frame_mask.flatten().nonzero().squeeze(1).to(device, non_blocking=True)  # (K,) real frames
        media_rows = media_mask.flatten().nonzero().squeeze(1).to(device, non_blocking=True)  # (M,) real media
        pixels = images.flatten(0, 2).index_select(0, frame_rows)  # (K, C, H, W)
        tower_dtype = next(self.vision.parameters()).dtype

        def tower(frames: torch.Tensor) -> torch.Tensor:  # (K, C, H, W) -> (K, S, Dv)
            # a frozen tower builds no graph, unless the pixels want a gradient (saliency): its weights stay frozen
            with torch.set_grad_enabled(torch.is_grad_enabled() and
                                        (not self.config.freeze_vision or frames.requires_grad)):
                return vision_features(self.vision, frames.to(tower_dtype), self.config.vision_feature_layer,
                                       self.config.drop_cls_token)

        if vision_cache is None:
            features = tower(pixels)  # (K, S, Dv)
        elif not self.config.freeze_vision or self.vision.training:
            raise ValueError("vision_cache needs a frozen vision tower in eval mode (freeze_vision=True): a trained "
                             "tower's features change every step")
        else:
            features = vision_cache.encode(pixels, tower)  # (K, S, Dv)
        dtype = next(self.resampler.parameters()).dtype
        grid = features.new_zeros(b * n * f, *features.shape[1:], dtype=dtype)  # (B·N·F, S, Dv)
        grid = grid.index_copy(0, frame_rows, features.to(dtype)).unflatten(0, (b * n, f))  # (B·N, F, S, Dv)
        real_frames = frame_mask.flatten(0, 1)[media_mask.flatten()]  # (M, F)
        # every frame real (stills, full clips): no mask, decided here on the mask's device (the CPU for loader
        # batches), so that a compiled resampler never reads it
        tokens = self.resampler(grid.index_select(0, media_rows),
                                None if bool(real_frames.all()) else real_frames)  # (M, R, Dv)
        tokens = tokens.to(self.visual_dtype)  # a no-op unless the blocks were cast apart from the resampler
        visual = tokens.new_zeros(b, n, *tokens.shape[1:])  # (B, N, R, Dv)
        # written in place through a (B·N, R, Dv) view, so `visual` (an output of `forward`) is a tensor of its own,
        # not a view: FSDP2 hooks its forward's outputs for backward and warns at a view (an in-place op on one
        # drops the hook). An out-of-place index_copy and an unflatten would also copy the zeros once more.
        visual.flatten(0, 1).index_copy_(0, media_rows, tokens)
        return visual

    @property
    def visual_dtype(self) -> torch.dtype:
        """The dtype of the visual tokens `encode_media` gives: the blocks', which project them. Each boundary casts to
        the module it enters, as the tower's features to the resampler's dtype and the LM's hidden states to each
        block's."""
        block = next(self.xattn.parameters(), None)
        return (block if block is not None else next(self.resampler.parameters())).dtype

    def as_visual_tokens(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """A caller's precomputed visual tokens (B, N, R, Dv) in the dtype `encode_media` gives (`visual_dtype`), as
        pixels of any dtype are cast to the tower's."""
        return visual_tokens.to(self.visual_dtype)

    # ------------------------------------------------------------------------------------------ forward
    def check_input_shapes(self, input_ids: torch.Tensor, images: Optional[torch.Tensor] = None,
                           num_media: Optional[torch.Tensor] = None,
                           visual_tokens: Optional[torch.Tensor] = None, *,
                           num_frames: Optional[torch.Tensor] = None,
                           **per_token: Optional[torch.Tensor]) -> None:
        """input_ids (B, T) of integer ids with T >= 1, media for the same B rows in the tower's channels,
        `num_frames (B, N)` within F, and each of `per_token` (attention_mask, labels, document_ids) (B, T): checked
        before any of them reaches the tower or the LM, where a mismatch failed deep inside torch. Shapes only, and
        values where they live on the CPU (no host sync; `check_token_ids` checks an accelerator's ids)."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, T) with at least one token, got shape {tuple(input_ids.shape)}"
                             + (": the prompt has no tokens" if input_ids.numel() == 0 else ""))
        if input_ids.dtype not in (torch.int32, torch.int64):  # what an embedding takes: int16 / uint8 fail in it
            raise ValueError(f"input_ids must hold integer token ids of dtype int64 (or int32), got {input_ids.dtype}")
        rows = input_ids.shape[0]
        for name, media in (("images", images), ("visual_tokens", visual_tokens), ("num_media", num_media)):
            if media is not None and torch.as_tensor(media).shape[:1] != (rows,):
                raise ValueError(f"input_ids has {rows} row(s) but {name} has shape "
                                 f"{tuple(torch.as_tensor(media).shape)}: one entry per row")
        for name, tensor in per_token.items():
            if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{tuple(tensor.shape)}")
        labels = per_token.get("labels")
        if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
            raise ValueError(f"labels must hold integer token ids (-100: not trained), got {labels.dtype}")
        if visual_tokens is not None:
            width = vision_hidden_size(self.vision)
            if visual_tokens.ndim != 4 or visual_tokens.shape[-1] != width:
                raise ValueError(f"visual_tokens must be (B, N_media, R, {width}) as encode_media makes them, got "
                                 f"shape {tuple(visual_tokens.shape)}")
        if images is not None and visual_tokens is None:
            if images.ndim not in (5, 6):
                raise ValueError(f"images must be (B, N_media, F, C, H, W), got shape {tuple(images.shape)}")
            channels = getattr(getattr(self.vision, "config", None), "num_channels", None)
            if channels is not None and images.shape[-3] != channels:
                raise ValueError(f"images have {images.shape[-3]} channel(s) at dimension -3 but the vision tower "
                                 f"takes {channels}: pixel values are (..., C, H, W), as the processor makes them")
            if isinstance(num_media, torch.Tensor) and num_media.device.type == "cpu" and \
                    bool(((num_media < 0) | (num_media > images.shape[1])).any()):
                raise ValueError(f"num_media must be in [0, {images.shape[1]}] (the images' N_media), got "
                                 f"{num_media.tolist()}")
            if num_frames is not None:
                num_frames = torch.as_tensor(num_frames)
                frames = images.shape[2] if images.ndim == 6 else 1
                if tuple(num_frames.shape) != tuple(images.shape[:2]):
                    raise ValueError(f"num_frames must be (B, N_media) = {tuple(images.shape[:2])}, got "
                                     f"{tuple(num_frames.shape)}")
                if num_frames.device.type == "cpu" and bool((num_frames > frames).any()):
                    raise ValueError(f"num_frames holds {int(num_frames.max())} but images have {frames} frame(s) "
                                     "per medium")
        if input_ids.device.type == "cpu":
            self.check_token_ids(input_ids)

    def check_token_ids(self, ids: torch.Tensor, what: str = "input_ids") -> None:
        """Every id in [0, V) of the LM's embedding table (V counts the added rows); a host sync on an accelerator,
        so `generate` and `score_batch` call it once per call and a training forward only on CPU ids."""
        vocab = self.lm.get_input_embeddings().weight.shape[0]
        ids = ids.long()  # compared in a dtype that holds the vocabulary's size (uint8 would wrap it)
        outside = (ids < 0) | (ids >= vocab)
        if bool(outside.any()):
            raise ValueError(f"{what} holds token id {int(ids[outside][0])}, outside the LM's vocabulary [0, {vocab})")

    def check_media_tokens(self, input_ids: torch.Tensor, num_media: Optional[torch.Tensor]) -> None:
        """Each sample must have exactly as many `<image>` tokens as media."""
        counts = (input_ids == self.config.media_token_id).sum(dim=1)
        expected = torch.zeros_like(counts) if num_media is None else torch.as_tensor(num_media, device=counts.device)
        bad = (counts != expected).nonzero(as_tuple=True)[0]
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"sample {i} has {int(counts[i])} <image> token(s) but {int(expected[i])} "
                             "image(s)/video(s)")

    def position_ids_for(self, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Left padding: positions count real tokens only, so a padded prompt == the same prompt alone."""
        if attention_mask is None or not self._lm_takes_position_ids:
            return None
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None, num_media: Optional[torch.Tensor] = None,
                num_frames: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                visual_tokens: Optional[torch.Tensor] = None, xattn_impl: XAttnImpl = "auto",
                check_media: bool = True, vision_cache: Optional[VisionFeatureCache] = None,
                document_ids: Optional[torch.Tensor] = None, loss_chunks: int = 0,
                **lm_kwargs: Any) -> Union[FlamingoOutput, tuple]:
        """input_ids (B, T); images (B, N, F, C, H, W) with `num_media (B,)` real media (default N) and
        `num_frames (B, N)` real frames (default F); or precomputed `visual_tokens (B, N, R, Dv)`.
        labels (B, T) (-100 = ignored; `<image>` and padded positions are ignored anyway) -> loss, logits (B, T, V).
        `num_media` / `num_frames` on the CPU (as data loaders make them) keep the media selection free of host syncs.
        `vision_cache` (frozen tower only): reuse the tower's features of frames seen in earlier calls.
        `document_ids (B, T)`: rows that pack several samples (`flamingo.data` with `pack_tokens`), one run of equal
        ids per sample, any other id on the padding. Each sample then sees only itself: the LM's attention and
        positions restart at each sample (transformers' packed-sequence masks), its tokens see only its own images,
        and no sample's last token is trained to predict the next sample's first.
        `loss_chunks` > 0 (with labels): the loss from the LM's last hidden states, the tokens' logits made in that
        many chunks, one at a time (chunked_loss.py); the output then has no logits. LMs that change their head's
        output (Gemma 2's logit soft-capping, say) get the whole logits instead (`head_is_last_op`).
        `lm_kwargs` go to the LM, as to an HF model: with a cache (`past_key_values`) the mask spans the cached tokens
        too and, with no `position_ids`, positions continue the uncached call's (padding not counted);
        `output_hidden_states` / `output_attentions` give the LM's; `return_dict=False` gives the output's
        `to_tuple()`; `logits_to_keep` is refused with labels (the loss needs every token's logits).
        """
        no_cache = all(lm_kwargs.get(name) is None for name in CACHE_NAMES)
        return_dict = lm_kwargs.pop("return_dict", None)  # False: the output as a tuple, as transformers gives it
        kept = [name for name in ("logits_to_keep", "num_logits_to_keep")  # an int (0: all) or a tensor of positions
                if (value := lm_kwargs.get(name)) is not None and not (isinstance(value, int) and value == 0)]
        if labels is not None and kept:
            raise ValueError(f"{kept[0]} keeps the logits of the last tokens only, but labels need every token's: "
                             f"pass labels or {kept[0]}, not both")
        self.check_input_shapes(input_ids, images, num_media, visual_tokens, num_frames=num_frames, labels=labels,
                                document_ids=document_ids,  # with a cache, the mask spans the cached tokens too
                                attention_mask=attention_mask if no_cache else None)
        if visual_tokens is None and images is not None:
            n = images.shape[1]
            if num_media is None:
                num_media = torch.full((input_ids.shape[0],), n, dtype=torch.long)
            elif not bool(torch.as_tensor(num_media).any()):  # no row holds a medium (a micro-batch of text-only
                # conversations): as a batch without images, the tower never called on zero frames
                images = None
            if images is not None:
                visual_tokens = self.encode_media(images, num_media, num_frames, vision_cache)
        elif visual_tokens is not None:
            visual_tokens = self.as_visual_tokens(visual_tokens)
            if num_media is None:
                num_media = torch.full((input_ids.shape[0],), visual_tokens.shape[1], dtype=torch.long)
        if check_media:  # a host sync on an accelerator: the trainer checks its CPU batch instead
            self.check_media_tokens(input_ids, num_media)
        limit = lm_max_positions(self.lm)
        if limit is not None and no_cache and input_ids.shape[1] > limit:  # shapes first: no host sync below it
            # packed rows restart their positions, so only their samples' lengths count (read, a host sync, only
            # where a row is longer than the LM's positions)
            longest = input_ids.shape[1] if document_ids is None else int(document_positions(document_ids).max()) + 1
            held = int(attention_mask.sum(-1).max()) if document_ids is None and attention_mask is not None and \
                attention_mask.ndim == 2 and attention_mask.shape[1] == longest else longest
            if held <= limit < longest:  # the padding is what does not fit (its columns take positions too)
                raise ValueError(f"the batch is padded to {longest} columns (its longest row holds {held} tokens), "
                                 f"but the LM has {limit} positions, which padded columns take too: pad to the "
                                 f"longest row (or at most {limit} columns)")
            if held > limit:
                raise ValueError(f"{held} tokens per {'row' if document_ids is None else 'packed sample'}, but "
                                 f"the LM has {limit} positions: cut the texts (a dataset's max_tokens) to fit")
        if self.training or labels is not None:  # a loss forward (training, validation) builds no KV cache (the
            # LM's own default would make one; a compiled layer would also compile one graph per layer's cache slot)
            lm_kwargs.setdefault("use_cache", False)
        lm_attention_mask = attention_mask
        if document_ids is not None:
            self._check_packing(lm_kwargs, no_cache)
            lm_kwargs["position_ids"] = document_positions(document_ids)
            lm_kwargs["use_cache"] = False  # transformers looks for packed samples only when no cache is made
            lm_attention_mask = None  # transformers reads the packed samples off the position ids
        elif "position_ids" not in lm_kwargs and (no_cache or _cache_is_empty(lm_kwargs) or (
                attention_mask is not None and attention_mask.ndim == 2
                and attention_mask.shape[1] > input_ids.shape[1])):
            # with a cache, the mask spans the cached tokens too: the new tokens' positions are its last T columns'
            # (as transformers' generate gives them), counted as in the uncached call that made the cache
            position_ids = self.position_ids_for(attention_mask)
            if position_ids is not None:
                lm_kwargs["position_ids"] = position_ids[:, -input_ids.shape[1]:]
        chunked = labels is not None and loss_chunks > 0 and self.head_is_last_op()
        ctx = MediaContext(Phase.FORWARD, visual_tokens, impl=xattn_impl, document_ids=document_ids,
                           defer_head=chunked)
        with self.conditioned(ctx):
            out = self.lm(input_ids=input_ids, attention_mask=lm_attention_mask, **lm_kwargs)
        loss = loss_tokens = None
        logits = out.logits
        if labels is not None:
            targets = self.loss_targets(labels, input_ids, attention_mask, document_ids)  # (B, T)
            loss_tokens = (targets != -100).sum()
            if not chunked:
                loss = whole_logits_cross_entropy(logits, targets)
            elif ctx.head_input is None:
                raise RuntimeError(f"{type(self.lm).__name__} never called its output head")
            else:
                loss, logits = chunked_cross_entropy(ctx.head_input, targets, self._head_logits, loss_chunks), None
        result = FlamingoOutput(loss=loss, logits=logits, cache=lm_output_cache(out), visual_tokens=visual_tokens,
                                loss_tokens=loss_tokens, hidden_states=getattr(out, "hidden_states", None),
                                attentions=getattr(out, "attentions", None))
        return result.to_tuple() if return_dict is False else result

    def _check_packing(self, lm_kwargs: dict[str, Any], no_cache: bool) -> None:
        """Packed rows need: the last-image rule, no cache, and an LM that keeps packed samples apart when given
        position ids that restart (transformers' packed-sequence masks; checked once by `_lm_packs_exactly`)."""
        if not self.config.only_attend_last_image:
            raise ValueError("packed rows (document_ids) need only_attend_last_image=True: with attention to every "
                             "earlier image, a sample would see the images of the samples packed before it")
        if self.config.attend_next_image:
            raise ValueError("packed rows (document_ids) need the last-image rule: with attend_next_image, a "
                             "sample's last text would see the next sample's first image")
        if self.config.imageless_rows_skip_blocks:
            raise ValueError("packed rows (document_ids) cannot skip the blocks per sample "
                             "(imageless_rows_skip_blocks): train on unpacked rows")
        if not no_cache or "position_ids" in lm_kwargs or lm_kwargs.get("use_cache"):
            raise ValueError("packed rows (document_ids) make their own position ids and take no KV cache")
        if self._packs_exactly is None:
            self._packs_exactly = self._lm_packs_exactly()
        if not self._packs_exactly:
            raise ValueError(f"this LM ({type(self.lm).__name__}, transformers {TRANSFORMERS_VERSION}) does not keep "
                             "packed samples apart (its attention mask ignores position ids that restart, or its "
                             "recurrent states cross them): set the dataset option pack_tokens: 0")

    def _lm_packs_exactly(self) -> bool:
        """Probe: two short token runs packed in one row (positions restarting at the second) must give the second
        run the logits it has alone, and the same logits after another first run. The first check is measured
        against the same row without restarts, so it holds in any dtype; the second compares two calls of one shape,
        which an LM that keeps the runs apart computes bit for bit alike, so only float noise is allowed: LMs whose
        mask ignores the restarts (XGLM) or whose recurrent / convolutional states cross them (RecurrentGemma,
        Falcon-H1) leak a little of the first run, which the position shift alone could hide. It also fails where
        transformers predates packed-sequence masks (the restarts are then ignored)."""
        if not self._lm_takes_position_ids:
            return False
        ids = self._plain_token_ids(14)  # (1, 14)
        row, other = ids[:, :9], torch.cat([ids[:, 9:], ids[:, 5:9]], dim=1)  # (1, 9) each: same second run
        device = ids.device

        def logits(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=x, position_ids=positions, use_cache=False).logits.float()

        with self._lm_in_eval_mode(), torch.no_grad():
            alone = logits(row[:, 5:], torch.arange(4, device=device)[None])
            restart = torch.cat([torch.arange(5), torch.arange(4)]).to(device)[None]
            packed = logits(row, restart)[:, 5:]
            after_other = logits(other, restart)[:, 5:]
            mixed = logits(row, torch.arange(9, device=device)[None])[:, 5:]  # what the position shift looks like
        error, contamination = (packed - alone).abs().max(), (mixed - alone).abs().max()
        leak = (packed - after_other).abs().max()
        alone_ok = error <= 0.1 * contamination if contamination > 0 else error == 0
        return bool(alone_ok and leak <= 1e-5 * alone.abs().max())

    def check_left_padding(self, attention_mask: Optional[torch.Tensor], what: str) -> None:
        """Refuses left-padded prompts (`attention_mask` (B, T) holding padding) on an LM that computes a padded
        prompt otherwise than the prompt alone (`pads_exactly`). Costs one host sync (is there padding?) until the
        probe has passed, none after."""
        if attention_mask is None or self._pads_exactly or bool(attention_mask.all()) or self.pads_exactly():
            return
        raise ValueError(f"{what}: this LM ({type(self.lm).__name__}, transformers {TRANSFORMERS_VERSION}) computes a "
                         "left-padded prompt otherwise than the prompt alone (it ignores the attention mask, or its "
                         "recurrent state runs over the padding): pass one prompt per call, unpadded (batch size 1; "
                         "flamingo eval: --batch-size 1)")

    def pads_exactly(self) -> bool:
        """Whether a left-padded prompt (mask 0 on the padding, positions counting its tokens only) gets the logits
        it has alone, as a batch of prompts of several lengths needs. Probed once (`_lm_pads_exactly`)."""
        if self._pads_exactly is None:
            self._pads_exactly = self._lm_pads_exactly()
        return self._pads_exactly

    def _lm_pads_exactly(self) -> bool:
        """Probe: a short prompt behind 3 padding tokens must get the logits it has alone, and the same logits
        behind other padding ids. The first check is measured against the same row with its padding seen (mask 1),
        so it holds in any dtype; the second compares two rows of one call, which an LM that hides the padding
        computes alike up to float noise: LMs that ignore the mask (RWKV) or whose recurrent states run over the
        padding (RecurrentGemma) let it in."""
        ids = self._plain_token_ids(12)  # (1, 12)
        prompt, pad = ids[:, 6:], 3
        rows = torch.cat([torch.cat([ids[:, :pad], prompt], 1), torch.cat([ids[:, pad:6], prompt], 1)])  # (2, 9)
        mask = torch.ones_like(rows)
        mask[:, :pad] = 0

        def logits(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            positions = self.position_ids_for(m)  # None for LMs that take no position ids
            kwargs = {} if positions is None else {"position_ids": positions}
            return self.lm(input_ids=x, attention_mask=m, use_cache=False, **kwargs).logits.float()

        with self._lm_in_eval_mode(), torch.no_grad():
            alone = logits(prompt, torch.ones_like(prompt))  # (1, 6, V)
            padded = logits(rows, mask)[:, pad:]  # (2, 6, V)
            seen = logits(rows[:1], torch.ones_like(rows[:1]))[:, pad:]  # what the padding would change
        error, contamination = (padded[:1] - alone).abs().max(), (seen - alone).abs().max()
        leak = (padded[0] - padded[1]).abs().max()
        alone_ok = error <= 0.1 * contamination if contamination > 0 else error == 0
        return bool(alone_ok and leak <= 1e-5 * alone.abs().max())

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor,
             attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next-token cross-entropy of logits (B, T, V), ignoring -100, `<image>` positions and padding."""
        return whole_logits_cross_entropy(logits, self.loss_targets(labels, input_ids, attention_mask))

    def loss_targets(self, labels: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None,
                     document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T): the token position t is trained to predict (-100: none), from labels (B, T). The one place that
        says which tokens the loss counts (the trainer weighs micro-batches and ranks by their number)."""
        if document_ids is not None:  # packed rows: a sample's first token is not predicted from another sample
            labels = labels.masked_fill(document_starts(document_ids), -100)
        labels = labels.masked_fill(input_ids == self.config.media_token_id, -100)
        if attention_mask is not None:  # with a cache it spans the cached tokens too: these tokens' are its last
            attention_mask = attention_mask[:, -labels.shape[1]:]
            labels = labels.masked_fill(attention_mask == 0, -100)
        # the labels are shifted, not the logits: (B, T, V) logits flatten to a view, where slicing off the last
        # position copied them (and their gradient) at every step (docs/training.md); int64 as cross_entropy takes
        # them (labels made in numpy may be int32)
        targets = F.pad(labels[:, 1:].long(), (0, 1), value=-100)  # (B, T): position t predicts token t + 1
        if attention_mask is not None:  # nor is a token predicted from padding: with left padding, a row's first
            # token follows the last padding column, which sees nothing real (the row would not be what it is alone)
            targets = targets.masked_fill(attention_mask == 0, -100)
        return targets

    def _plain_token_ids(self, n: int) -> torch.Tensor:
        """(1, n) ids of the LM's own vocabulary (none of the added tokens) on its device, for a probe."""
        first = self.config.first_new_token_id or lm_text_config(self.lm).vocab_size
        return torch.arange(1, n + 1, device=next(self.lm.parameters()).device)[None] % max(first - 1, 1) + 1

    @contextmanager
    def _lm_in_eval_mode(self) -> Iterator[None]:
        """The LM in eval mode (no dropout) for a probe, and every module's own mode back afterwards: a frozen LM
        in eval mode keeps its decoder layers in train mode for activation checkpointing (`train`). Under
        `_LAYER_FLAGS`: two threads' probes restoring each other's saved modes would leave the LM in eval."""
        with _LAYER_FLAGS:
            modes = [(module, module.training) for module in self.lm.modules()]
            self.lm.eval()
            try:
                yield
            finally:
                for module, mode in modes:
                    module.training = mode

    def head_is_last_op(self) -> bool:
        """Whether the LM's logits are its output head's output, unchanged (up to a cast to fp32): what a chunked
        loss needs. Probed once on a few tokens; false for heads followed by soft-capping or scaling (Gemma 2,
        Cohere), and for LMs without an output head module."""
        if self._head_is_last is None:
            head = self.lm.get_output_embeddings()
            self._head_is_last = head is not None and self._probe_head(head)
        return self._head_is_last

    def _probe_head(self, head: nn.Module) -> bool:
        seen: list[torch.Tensor] = []
        probing = threading.get_ident()  # another thread's LM call through the head is not the probe's

        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if threading.get_ident() == probing:
                seen.append(output)

        handle = head.register_forward_hook(record)
        ids = self._plain_token_ids(8)  # (1, 8)
        try:
            with self._lm_in_eval_mode(), torch.no_grad():
                logits = self.lm(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
        return (len(seen) == 1 and seen[0].shape == logits.shape
                and torch.equal(seen[0].float(), logits.float()))

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 images: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """Cached generation (see `flamingo.model.generation.generate`)."""
        return generation.generate(self, input_ids, attention_mask, images, **kwargs)

    def score(self, input_ids: torch.Tensor, continuations: Any, **kwargs: Any) -> torch.Tensor:
        """Log-likelihoods of continuations after one shared context (see `flamingo.model.generation.score`)."""
        return generation.score(self, input_ids, continuations, **kwargs)

    def score_batch(self, input_ids: torch.Tensor, continuations: Any, **kwargs: Any) -> list[torch.Tensor]:
        """Each left-padded context's own candidates, several contexts at once (`generation.score_batch`)."""
        return generation.score_batch(self, input_ids, continuations, **kwargs)

    # ------------------------------------------------------------------------------------------ parameters
    def train(self, mode: bool = True) -> "Flamingo":
        """Frozen backbones stay in eval mode (no dropout): frozen means the same function at every step. Waits for
        the calls of other threads that hold the frozen layers' flags (`_LAYER_FLAGS`)."""
        with _LAYER_FLAGS:
            return self._set_mode(mode)

    def _set_mode(self, mode: bool) -> "Flamingo":
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()
        if self.config.freeze_lm:
            self.lm.eval()
            if mode and self._activation_checkpointing:
                # HF checkpoints a layer only when the layer is in training mode: the layers' own flags say so (not
                # their submodules': dropout modules stay in eval), and `_layers_run_in_eval` clears them again
                # while a layer computes, for the layers that read it themselves (OPT's, Falcon's dropout), and
                # for every call that is not a forward with gradients (`conditioned`).
                for layer in self.lm.get_submodule(self.decoder_layers_path):
                    layer.training = True
            if self.config.lm_lora is not None:
                lora.train_adapters(self.lm, mode)
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing of the LM's decoder layers (HF's own, non-reentrant). The recompute during
        backward runs after the call's media context is gone, so each checkpointed layer re-installs, for its
        recompute only, the context it saw in forward (`context_fn`). A frozen LM's layers still compute in eval
        mode, as without checkpointing: the same loss and gradients, no dropout (`_layers_run_in_eval`)."""
        kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        enable = getattr(self.lm, "activation_checkpointing_enable", None) or self.lm.gradient_checkpointing_enable
        enable(kwargs)
        self._activation_checkpointing = True
        self.train(self.training)
        if hasattr(self.lm, "enable_input_require_grads") and not self.config.freeze_lm:
            self.lm.enable_input_require_grads()

    def _checkpoint_contexts(self) -> tuple[Any, Any]:
        ctx = self._media_context
        snapshot = None if ctx is None else ctx.for_recompute()

        @contextmanager
        def recompute() -> Iterator[None]:
            with self._layers_run_in_eval():
                if snapshot is None or self._media_context is not None:
                    yield
                    return
                with self.conditioned(snapshot):
                    yield

        return self._layers_run_in_eval(), recompute()

    @contextmanager
    def _layers_run_in_eval(self) -> Iterator[None]:
        """A frozen LM's decoder layers in eval mode while a checkpointed layer computes (forward and recompute), as
        without checkpointing: their training flag (`train`) is only there to make HF checkpoint them, and a layer
        that reads it itself would apply its dropout. A trained LM's layers are left as they are."""
        if not (self.config.freeze_lm and self._activation_checkpointing):
            yield
            return
        with _LAYER_FLAGS:  # another thread's flip is undone only after it is done (`_LAYER_FLAGS`)
            layers = [layer for layer in self.lm.get_submodule(self.decoder_layers_path) if layer.training]
            for layer in layers:
                layer.training = False
            try:
                yield
            finally:
                if self.training:  # (not when the model was put in eval mode inside the call)
                    for layer in layers:
                        layer.training = True

    def merge_lora(self) -> None:
        """Fold the LM's LoRA adapters into its weights (inference: no adapter matmuls; the same logits). The LM is a
        plain HF model again: `config.lm_lora` is cleared and the merged weights join `config.extra_saved_weights`,
        so that a trained-only checkpoint saved afterwards keeps them. Merge before quantizing the backbones."""
        if self.config.lm_lora is None:
            raise ValueError("this model has no LoRA adapters on its LM (config.lm_lora is None)")
        if quantize.quantized_mode(self) != "none":
            raise ValueError("merge_lora needs the LM's float weights: merge before quantizing the backbones")
        def merged(name: str) -> None:  # as each weight changes: an interrupted merge leaves none unrecorded
            self.config.extra_saved_weights = sorted(set(self.config.extra_saved_weights) | {f"lm.{name}"})

        lora.merge_lora(self.lm, merged)
        self.config.lm_lora = None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def _saved_tensors(self, trained_only: bool) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        keep = {k for k in state if not k.startswith(BACKBONE_PREFIXES)}
        keep |= set(self.config.extra_saved_weights)
        keep |= {k for k in state if lora.is_adapter_key(k)}  # LM adapters: beside our tensors in either mode
        if trained_only:
            keep |= {k for k, p in self.named_parameters() if p.requires_grad}
        # Clone so that tied tensors become separate entries (safetensors refuses shared storage).
        return {k: state[k].detach().to("cpu").contiguous().clone() for k in sorted(keep)}

    # ------------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str, *, trained_only: bool = False, processor: Any = None,
                        backbones_from: Union[str, os.PathLike, None] = None) -> None:
        """Write the model atomically into `directory` (replaced whole: a new or empty one, or an earlier checkpoint,
        whose processor files are carried over when `processor` is None, and its card (README.md) when edited by hand;
        any other file there is refused by name).
        Full: the backbones as HF directories (`vision/`, `lm/`) + our weights.
        trained_only: only the trained tensors + references (name/path, and a Hub name's commit) to the backbones in
        the config, so a 9B model's checkpoint holds its ~1-2B trained parameters. Refused, before anything is
        written, when a reference does not resolve here (`unresolved_backbones`: a full checkpoint copied from another
        machine keeps its builder's paths), since the checkpoint could not load, and saving over the full one would
        delete the only copy of its backbones; and when `directory` holds a backbone it refers to (replacing it would
        delete that backbone). A Hub name without a recorded commit is saved with a warning: it loads whatever the
        repository holds then. The backbones must be the weights their references load: an in-memory backbone
        changed after loading (edited, a merged PEFT adapter) is only kept by a full save.
        backbones_from: a model saved whole whose `vision/` and `lm/` are these backbones in float (the directory a
        model with quantized frozen backbones was built on: training changes no frozen weight): a full save whose
        backbones are copies of those files, beside the tensors a trained-only save writes (the trained ones among
        them), so that it loads as this model with its backbones unquantized (`quantize_frozen` quantizes them again
        as they were). The config is saved as it is: its backbone references stay the model's own."""
        source = None if backbones_from is None else os.fspath(backbones_from)
        if source is not None:
            if trained_only:
                raise ValueError("save_pretrained: backbones_from copies backbones into a full save; a trained-only "
                                 "checkpoint holds none (pass one of trained_only=True and backbones_from)")
            missing = [part for part in BACKBONE_DIRS if not os.path.isdir(os.path.join(source, part))]
            if missing:
                raise ValueError(f"backbones_from {source!r} holds no {' or '.join(p + '/' for p in missing)}: give "
                                 "a model saved whole (save_pretrained without trained_only)")
            state = self.state_dict()
            quantized = [k for k in self.config.extra_saved_weights if k in state and quantize.is_quantized(state[k])]
            if quantized:  # saved beside the copies, but safetensors cannot write torchao tensors
                raise ValueError(f"the model's changed backbone weights {quantized[:3]} (extra_saved_weights, e.g. a "
                                 "merged LoRA) are quantized: save before quantizing, or load with "
                                 "quantize_frozen='none'")
        if trained_only:
            self._check_trained_only_save(directory)
        stored = quantize.quantized_mode(self)
        if not trained_only and source is None and stored != "none":  # lossy: never written as the backbones' weights
            raise ValueError(f"the backbones are quantized ({stored}): save a trained-only checkpoint "
                             "(save_pretrained(..., trained_only=True); loading quantizes them again), or save the "
                             "model before quantizing it")
        kept = kept_on_save(directory, with_processor=processor is not None, config=self.config)
        card = edited_card(directory)
        if card is not None:
            log.warning("keeping the %s in %r, which is not the card its files give (edited by hand, or written by "
                        "another version): delete it to have the card written anew", CARD_NAME, directory)
        with atomic_directory(directory, CONFIG_NAME, "a saved Flamingo model") as tmp:
            for name in kept:  # the processor saved there by its own save_pretrained (the HF habit)
                shutil.copy2(os.path.join(directory, name), os.path.join(tmp, name))
            tensors = self._saved_tensors(trained_only or source is not None)  # copied backbones lack trained ones
            metadata = {"format": "pt"}
            if trained_only:  # the backbones' files, named by reference, say nothing of the dtype they ran in here
                metadata[BACKBONE_DTYPES_KEY] = json.dumps({part: str(dtype).removeprefix("torch.") for part, dtype in
                                                            (("vision", bulk_dtype(self.vision)),
                                                             ("lm", bulk_dtype(self.lm))) if dtype is not None})
            save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata=metadata)
            if source is not None:
                for part in BACKBONE_DIRS:  # copies, not links: a file rewritten in place later changes no save
                    shutil.copytree(os.path.join(source, part), os.path.join(tmp, part))
            elif not trained_only:
                self.vision.save_pretrained(os.path.join(tmp, "vision"))
                bare = {"state_dict": lora.base_state_dict(self.lm)} if lora.has_lora(self.lm) else {}
                self.lm.save_pretrained(os.path.join(tmp, "lm"), **bare)  # the bare LM: its adapters live in ours
            if processor is not None:
                processor.save_pretrained(tmp)
            self.config.save(tmp)
            # named after the directory (a push renames it); UTF-8 whatever the platform's encoding: the name may be
            # in any script, and a push reads the card as UTF-8
            with open(os.path.join(tmp, CARD_NAME), "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(card if card is not None else model_card(tmp, os.path.basename(os.path.abspath(directory))))

    def _check_trained_only_save(self, directory: str) -> None:
        """Why a trained-only checkpoint of this model in `directory` could not load back, as a ValueError: backbones
        with no name/path, names/paths that do not resolve here or that `directory` would replace, or changed backbone
        weights (`extra_saved_weights`, e.g. a merged LoRA) that are quantized (safetensors cannot write torchao
        tensors; their float values are gone). Warns about Hub names without a recorded commit."""
        if not (self.config.vision_name_or_path and self.config.lm_name_or_path):
            raise ValueError("a trained-only checkpoint needs the backbones' names/paths: build the model with "
                             "from_backbones(vision='name', lm='name') or save the full model")
        unresolved = unresolved_backbones(self.config)
        if unresolved:
            raise ValueError(f"the backbone(s) {', '.join(unresolved)} named in the config are neither a directory "
                             "here nor a Hub name, so a trained-only checkpoint could not load: save the full model "
                             "(save_pretrained without trained_only), or point the config's *_name_or_path at them")
        for ref in (self.config.vision_name_or_path, self.config.lm_name_or_path):
            check_apart(directory, ref, "a trained-only checkpoint", inside=False)  # (a Hub name is not checked)
        unpinned = [f"{part}_name_or_path {ref!r}" for part, ref, rev in (
            ("vision", self.config.vision_name_or_path, self.config.vision_revision),
            ("lm", self.config.lm_name_or_path, self.config.lm_revision)) if is_hub_reference(ref) and rev is None]
        if unpinned:
            log.warning("the trained-only checkpoint names the Hub backbone(s) %s without a commit: loading it reads "
                        "what the repository holds then, which may have changed. Record the revision they were loaded "
                        "at (from_backbones(..., vision_revision=, lm_revision=), or model.config.vision_revision / "
                        "lm_revision), or save the full model", ", ".join(unpinned))
        state = self.state_dict()
        quantized = [k for k in self.config.extra_saved_weights if k in state and quantize.is_quantized(state[k])]
        if quantized:
            raise ValueError(f"the model's changed backbone weights {quantized[:3]} (extra_saved_weights, e.g. a "
                             "merged LoRA) are quantized: save before quantizing, or load with quantize_frozen='none'")

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, torch_dtype: Union[torch.dtype, str, None] = None,
                        device: Union[str, torch.device, None] = None, quantize_frozen: Optional[str] = None,
                        revision: Optional[str] = None) -> "Flamingo":
        """Load what `save_pretrained` wrote (either mode): a directory, or a Hub repository holding one (`org/name`,
        at `revision`), downloaded once. No pickle: safetensors + HF directories. The frozen backbones are quantized
        on `device` to `quantize_frozen` (default: the saved config's mode).

        torch_dtype: the whole model's, backbones included (whatever dtype their own configs name); also a name
        (`checked_torch_dtype`). None or "auto": the model as it was saved: the resampler, blocks, added rows and
        LoRA adapters in the floating dtype of `flamingo.safetensors` when it holds one (a model saved in bf16 loads
        in bf16), else float32; a backbone saved whole (`vision/`, `lm/`) in the dtype its config.json records (bf16
        backbones saved beside float32 trained parts stay bf16); a backbone named by reference in the dtype the
        trained-only save recorded it in (`BACKBONE_DTYPES_KEY`: a `train.frozen_dtype: bf16` run's stay bf16), else
        (a save without the record) in the trained tensors' dtype. The model's `name_or_path` is the one given here.
        A trained-only checkpoint's backbones named by Hub name load at the commits its config records
        (`_load_backbone`). A Hub repository that is no saved Flamingo is refused from its configs, before weights."""
        torch_dtype = checked_torch_dtype(torch_dtype)
        if local_or_hub(name_or_path, "Flamingo model") == "hub":  # its configs first: a repository that is no
            # saved Flamingo (an LM, a CLIP) is refused before its weights are fetched
            FlamingoConfig.load(metadata_dir(name_or_path, "Flamingo model", revision=revision))
        directory = local_dir(name_or_path, "Flamingo model", revision=revision)
        config = FlamingoConfig.load(directory)
        if quantize_frozen is not None:
            config = dataclasses.replace(config, quantize_frozen=quantize_frozen)  # validated like a saved one
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            why = ("a Hub snapshot whose weights were not downloaded (HF_HUB_OFFLINE=1 with only its configs in the "
                   "hub cache?)" if snapshot_commit(directory) else "an incomplete copy?")
            name = os.fspath(name_or_path)
            where = repr(name) if name == directory else f"{name!r} ({directory})"
            raise FileNotFoundError(f"{where} holds {CONFIG_NAME} but no {WEIGHTS_NAME}: {why}")
        try:
            state = load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or damaged): {e}") from e
        own = torch_dtype or saved_dtype(state)
        referenced = referenced_backbone_dtypes(path)
        parts = {part: torch_dtype or recorded_dtype(os.path.join(directory, part)) or referenced.get(part) or own
                 for part in BACKBONE_DIRS}
        vision = _load_backbone(directory, config, "vision", parts["vision"])
        lm = _load_backbone(directory, config, "lm", parts["lm"])
        model = cls(vision, lm, config)
        ours = {k for k in model.state_dict() if not k.startswith(BACKBONE_PREFIXES) or lora.is_adapter_key(k)}
        missing = ours - set(state)
        if missing:
            raise ValueError(f"checkpoint {directory!r} lacks weights: {sorted(missing)[:5]}")
        listed = set(config.extra_saved_weights) - set(state)
        if listed:  # the backbone tensors the model changed (a fine-tuned table, merged LoRA): the base's are wrong
            raise ValueError(f"{path!r} lacks {sorted(listed)[:5]}, which {CONFIG_NAME} lists in extra_saved_weights "
                             "(backbone weights the model changed): the file is incomplete, or the config was edited")
        check_state_shapes(model, state, f"checkpoint {directory!r}",
                           f"it was saved with other backbones or another config; check {CONFIG_NAME} and the "
                           f"backbones (vision {config.vision_name_or_path!r}, lm {config.lm_name_or_path!r}, or "
                           "the vision/ and lm/ directories beside it)")
        # the dtypes first: loaded into tensors made in a backbone's dtype (PEFT's adapters, the added rows taken from
        # the LM's table), float32 weights would be rounded to it
        _cast_parts(model, own, parts, ours)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {directory!r} has unknown weights: {result.unexpected_keys[:5]}")
        if device is not None:
            model.to(device)
        counts = quantize.quantize_frozen(model)  # config.quantize_frozen, on the device just chosen
        if config.quantize_frozen != "none":
            log.info("%s", quantize.describe_counts(config.quantize_frozen, counts))
        model.name_or_path = os.fspath(name_or_path)
        return model.eval()


def _cast_parts(model: Flamingo, own: torch.dtype, backbones: Mapping[str, torch.dtype],
                ours: set[str]) -> None:
    """The model's own tensors (`ours`: the resampler, blocks, added rows, LoRA adapters) in `own`; the backbones'
    other tensors stay as their loader made them, in `backbones`' dtypes. One dtype for all: `to_dtype(model, own)`."""
    if set(backbones.values()) == {own}:
        to_dtype(model, own)
        return
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in ours and t.is_floating_point() and t.dtype != own:
            t.data = t.data.to(own)


def checked_torch_dtype(torch_dtype: Union[torch.dtype, str, None]) -> Optional[torch.dtype]:
    """`torch_dtype` as a floating torch dtype, or None for None and "auto" (the saved dtype). Names are transformers'
    ("bfloat16", "float16", "float32") and the CLI's ("bf16", "fp16", "fp32"); anything else is a ValueError before
    any weight is read (a name would otherwise reach `model.to`, which reads it as a device, after the whole load)."""
    if isinstance(torch_dtype, str):
        if torch_dtype not in DTYPE_STRINGS:
            raise ValueError(f"torch_dtype {torch_dtype!r} is not a dtype name: use a torch.dtype or one of "
                             f"{', '.join(DTYPE_STRINGS)}")
        return DTYPE_STRINGS[torch_dtype]
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}")
    return torch_dtype


def _cache_is_empty(lm_kwargs: Mapping[str, Any]) -> bool:
    """Whether the cache `lm_kwargs` hand the LM holds no token yet (a fresh `DynamicCache()`, a custom loop's
    first call): its positions are then the uncached call's."""
    cache = next((lm_kwargs[name] for name in CACHE_NAMES if lm_kwargs.get(name) is not None), None)
    length = getattr(cache, "get_seq_length", None)
    return cache is not None and callable(length) and length() == 0


# what must agree between the model saved in a directory and the one saved over it for the processor there to be the
# new one's too: the same LM and the same added tokens at the same ids
_PROCESSOR_IDENTITY = ("lm_name_or_path", "media_token_id", "end_of_chunk_token_id", "first_new_token_id",
                       "num_new_tokens", "first_reference_token_id", "num_image_references", "pad_token_id")


def kept_on_save(directory: str, *, with_processor: bool, config: Optional[FlamingoConfig] = None) -> list[str]:
    """The processor's files in `directory`, an earlier save, that a save carries over when it writes no processor
    of its own (`with_processor` False: saved there by `processor.save_pretrained(directory)`, as with
    transformers), if the model saved there had `config`'s LM and added tokens (else a ValueError: another model's
    tokenizer would embed the wrong ids without an error). Any other file that no save writes (the user's own) is
    refused by name: saving replaces the directory whole, so it would be deleted. The CLI calls it before a
    conversion, which saves at its end."""
    check_named(directory, "a saved Flamingo model")  # "" would name the working directory's files
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return []  # a new or empty directory, or one `atomic_directory` refuses for holding no checkpoint
    foreign = foreign_entries(directory, SAVED_ENTRIES + PROCESSOR_FILES)
    if foreign:
        raise ValueError(f"{directory!r} holds {', '.join(foreign)}, which no save writes: saving the model there "
                         "replaces the directory whole and would delete them; move them out, or save into a new "
                         "directory")
    kept = [] if with_processor else [name for name in os.listdir(directory)  # else: written anew
                                      if name in PROCESSOR_FILES and os.path.isfile(os.path.join(directory, name))]
    if kept and config is not None:
        try:
            before: Optional[FlamingoConfig] = FlamingoConfig.load(directory)  # older saves' missing fields: defaults
        except (OSError, ValueError):
            before = None
        differ = [k for k in _PROCESSOR_IDENTITY if before is None or getattr(before, k) != getattr(config, k)]
        if differ:
            raise ValueError(f"{directory!r} holds the processor of another model (its {differ[0]} differs from this "
                             "one's): pass processor= to save this model's, or save into a new directory")
    return kept


def unresolved_backbones(config: FlamingoConfig) -> list[str]:
    """The backbone references of `config` that do not resolve here, as "vision_name_or_path '...'" strings: set,
    but neither a directory nor a Hub name (`runtime.hub.local_or_hub`; a Hub name is not looked up, so this needs
    no network). Empty when both resolve or are unset. A trained-only checkpoint of a model with any is unloadable:
    `save_pretrained` refuses it, and a trainer saves the full model instead."""
    unresolved = []
    for key in ("vision_name_or_path", "lm_name_or_path"):
        ref = getattr(config, key)
        if ref is None:
            continue
        try:
            local_or_hub(ref, key)
        except FileNotFoundError:
            unresolved.append(f"{key} {ref!r}")
    return unresolved


# The key, in the metadata of a trained-only save's `flamingo.safetensors`, of the dtype each backbone it names by
# reference ran in (JSON: {"vision": "bfloat16", "lm": "bfloat16"}). In the file's metadata, not in FlamingoConfig:
# `FlamingoConfig.from_dict` refuses fields it does not know, so a config field would make an older version refuse
# the save; an older version never reads the metadata and loads the backbones in the trained tensors' dtype.
BACKBONE_DTYPES_KEY = "flamingo.backbone_dtypes"


def bulk_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype most of a backbone's parameter elements are held in: its frozen weights' (bf16 under
    `train.frozen_dtype: bf16`) beside a few trained float32 ones (LoRA adapters). None without floating ones."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else None


def referenced_backbone_dtypes(path: str) -> dict[str, torch.dtype]:
    """The backbone dtypes a trained-only save recorded in the metadata of `path` (its `flamingo.safetensors`), by
    part; empty for a save without the record (a whole save, or one written before it was recorded). A value that is
    not a floating dtype's name is skipped (the backbone then loads as it would without the record)."""
    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get(BACKBONE_DTYPES_KEY)
    try:
        named = json.loads(raw) if raw is not None else {}
    except ValueError:
        named = {}
    dtypes = {part: getattr(torch, name, None) for part, name in named.items()
              if part in BACKBONE_DIRS and isinstance(name, str)} if isinstance(named, dict) else {}
    return {part: d for part, d in dtypes.items() if isinstance(d, torch.dtype) and d.is_floating_point}


def saved_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a saved model loads in by default: its tensors' floating dtype when they have one, else float32."""
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    return floats.pop() if len(floats) == 1 else torch.float32


def _load_backbone(directory: str, config: FlamingoConfig, part: str, dtype: torch.dtype) -> nn.Module:
    """The `part` ("vision" or "lm") of the saved model in `directory`, in `dtype`: its own `part/` directory, else
    the backbone its config names (a local directory, or a Hub name at the commit `part_revision` records; a config
    without one reads the default branch and records its commit in `config`). A reference that is neither, or a
    backbone that cannot be read, is a clear error naming the config key or the directory."""
    key = f"{part}_name_or_path"
    ref = getattr(config, key)
    local = os.path.join(directory, part)
    if os.path.isdir(local):
        source, where = local, repr(local)
    elif ref is None:
        raise ValueError(f"{directory!r} holds no {part}/ directory and its config names no {part} backbone")
    else:
        source, where = ref, f"{ref!r} ({key} in {os.path.join(directory, CONFIG_NAME)})"
    load, what = (load_vision_tower, "vision tower") if part == "vision" else (load_lm, "LM")
    kwargs = dtype_kwargs(dtype)
    if source is ref and is_hub_reference(ref):  # a Hub name: at its recorded commit (a local path has no revisions)
        revision = getattr(config, f"{part}_revision")
        if revision is None:  # saved before commits were recorded: the default branch's, kept for a later save
            try:
                revision = hub_commit(ref, what)
            except FileNotFoundError as e:
                raise ValueError(f"cannot load the {what} of {directory!r} from {where}: {e}") from e
            setattr(config, f"{part}_revision", revision)
        kwargs["revision"] = revision
    try:
        return load(source, **kwargs)
    except FileNotFoundError as e:  # the loaders' `local_or_hub`: neither a directory nor a Hub name
        if source is not ref:
            raise
        raise FileNotFoundError(f"{directory!r} is a trained-only checkpoint whose {key} {ref!r} is neither a "
                                f"directory nor a Hub name: moved or deleted? Point {key} in {CONFIG_NAME} at the "
                                "backbone") from e
    except (OSError, SafetensorError) as e:  # a missing or damaged weights file, a Hub name that cannot be read
        raise ValueError(f"cannot load the {what} of {directory!r} from {where}: "
                         f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from e


def check_state_shapes(model: Union[nn.Module, Mapping[str, Any]], state: Mapping[str, Any], what: str,
                       hint: str = "is it the backbone and config the checkpoint was trained with?") -> None:
    """Refuse `state` where a tensor's shape differs from its namesake's in `model`, before `load_state_dict` fails
    with torch's `size mismatch`: a ValueError naming `what`, the first differing tensors with both shapes, and `hint`.

    model: a module (its state dict, meta parameters included) or tensors/shapes by name. state: tensors, or their
    shapes, by name (pass shapes for a checkpoint read lazily). Names only one side has are left to the caller."""
    ours = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model
    bad = []
    for name in state:
        if name in ours:
            theirs, mine = _shape(state[name]), _shape(ours[name])
            if theirs != mine:
                bad.append(f"{name} is {theirs} there, {mine} in the model")
    if bad:
        raise ValueError(f"{what} does not fit the model: {len(bad)} tensor(s) differ in shape ("
                         f"{'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}): {hint}")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)
