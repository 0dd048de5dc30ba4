"""`Prefill`: one prompt prefilled for continuous batching, in chunks, optionally from a `PrefixCache`.

`step()` runs the next chunk of at most `chunk` tokens (the media are encoded with the first chunk, or a few per step
in steps of their own), so rows already decoding wait at most one chunk for a joining prompt. After the last chunk it
returns a `PrefilledRow`: the prompt's LM cache, each block's visual K/V that its decode steps read, its decode media
index, the last logits; `DecodeBatch.add` copies it into the running batch (model/batching.py).

With a prefix cache, the prompt's first whole blocks that an earlier prompt prefilled (same tokens, same media) are
not computed again: the prefill starts after them, with their K/V and visual tokens, and afterwards the prompt's own
new blocks are stored for later prompts (model/prefix_cache.py).

With `prompt_logprobs`, every chunk keeps its logits long enough to give each prompt token (but the first) its
log-probability and its position's likeliest tokens (a server's `echo` with `logprobs`). Such a prompt starts from
the prefix cache's blocks that keep their tokens' log-probabilities (stored by earlier such prompts; at most
`STORED_TOP` alternatives asked for), recomputing from the last reused token on, whose logits give the next token
its log-probability; its blocks are stored with theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from transformers.cache_utils import DynamicCache

from ..runtime.compat import lm_cache_argument, lm_last_logits_only, lm_takes_position_ids
from .context import MediaContext, Phase
from .feature_cache import VisionFeatureCache
from .logprobs import TokenLogprobs, token_logprobs
from .prefix_cache import STORED_TOP, PrefixCache
from .xattn import MediaKV, compute_media_index

if TYPE_CHECKING:  # annotations only
    from .flamingo import Flamingo


@dataclass
class PrefilledRow:
    """What a prompt's prefill leaves for its decode steps."""

    cache: DynamicCache  # the prompt's LM cache, one row
    length: int  # prompt tokens
    media_kv: Optional[list[MediaKV]]  # per block, (1, N, R, h, d) (N = 1 for the last image); None: no image
    decode_index: torch.Tensor  # (1, 1) the media context's decode index after the prompt
    decode_count: Optional[torch.Tensor]  # (1, 1) images of the prompt, for decoding with references
    logits: torch.Tensor  # (V,) the prompt's last position
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    prompt_logprobs: Optional[TokenLogprobs] = None  # of tokens 1..T-1, when the prefill was asked for them


class Prefill:
    """One prompt prefilled in chunks: `step()` runs the next chunk and returns the `PrefilledRow` after the last.

    input_ids (T,); images (1, N, F, C, H, W) or None, with num_media (1,) and num_frames (1, N) as the processor
    makes them. Chunks continue the prompt's media index (a PREFILL context spans all of them). prefix_cache: reuse
    and extend the prefills of earlier prompts that begin alike. prompt_logprobs: give the prompt's tokens their
    log-probabilities, with this many likeliest alternatives per position (None: not computed). vision_cache: the
    frozen tower's features of frames seen by earlier prompts (`VisionFeatureCache`)."""

    def __init__(self, model: Flamingo, input_ids: torch.Tensor, images: Optional[torch.Tensor] = None,
                 num_media: Optional[torch.Tensor] = None, num_frames: Optional[torch.Tensor] = None, *,
                 chunk: int = 64, prefix_cache: Optional[PrefixCache] = None,
                 prompt_logprobs: Optional[int] = None, vision_cache: Optional[VisionFeatureCache] = None) -> None:
        if input_ids.ndim != 1 or input_ids.numel() == 0:
            raise ValueError("Prefill takes one non-empty prompt, input_ids (T,)")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if prompt_logprobs is not None and prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {prompt_logprobs}")
        if model.whole_prompt_rules:  # a block's tokens depend on what follows it: not reused
            prefix_cache = None
        self.model, self.chunk, self.prefix_cache, self.vision_cache = model, chunk, prefix_cache, vision_cache
        self.prompt_logprobs = prompt_logprobs
        self._logprobs: list[TokenLogprobs] = []  # per chunk run, with prompt_logprobs
        self.device = next(model.lm.parameters()).device
        self.input_ids = input_ids.to(self.device)
        self.images, self.num_media, self.num_frames = images, num_media, num_frames
        self.done = 0
        self._checked = False
        self._visual: list[torch.Tensor] = []  # (1, n, R, Dv) per group of media encoded so far (or reused)
        self.ctx: Optional[MediaContext] = None
        self.cache: Optional[DynamicCache] = None
        self.cached_tokens = 0
        self._keys: Optional[list[bytes]] = None  # the prefix cache's block keys, once computed (`block_keys`)
        self._media_per_block: list[int] = []

    @property
    def length(self) -> int:
        return self.input_ids.numel()

    @property
    def total_media(self) -> int:
        """The prompt's media (images and videos)."""
        if self.images is None:
            return 0
        return int(self.num_media[0]) if self.num_media is not None else self.images.shape[1]

    @property
    def media_done(self) -> int:
        """Media whose visual tokens are ready (encoded, or taken from the prefix cache)."""
        return sum(v.shape[1] for v in self._visual)

    @property
    def fresh(self) -> bool:
        """Prepared, with nothing run, encoded or taken from the prefix cache, and no prompt log-probabilities
        asked for: it may be prefilled together with other fresh prompts (`prefill_together`)."""
        return (self._checked and self.ctx is None and self.done == 0 and not self._visual
                and self.prompt_logprobs is None)

    @property
    def needs_media(self) -> bool:
        """Whether the next `step` encodes media (after `prepare`): some are left, and no chunk has run."""
        return self.ctx is None and self.media_done < self.total_media

    def prepare(self) -> None:
        """Check the prompt's media tokens against its media and take what the prefix cache holds (the first `step`
        does it when nobody did before). Raises ValueError for a prompt whose `<image>` tokens and media differ."""
        if not self._checked:
            self._check_and_reuse()

    @torch.no_grad()
    def step(self, chunk: Optional[int] = None, media_per_step: Optional[int] = None) -> Optional[PrefilledRow]:
        """Run the next chunk (`chunk` tokens, default the constructor's). media_per_step: encode the media in
        steps of their own, this many media per step (so that no step costs a whole prompt's media plus a chunk);
        None: all of them with the first chunk."""
        model = self.model
        chunk = self.chunk if chunk is None else chunk
        if self.ctx is None:
            self.prepare()
            encoded = self._encode_media(media_per_step)
            if encoded is None:
                return None
            media_tokens = (self.input_ids == model.config.media_token_id).sum()[None]  # (1,) the whole prompt's
            self.ctx = MediaContext(Phase.PREFILL, torch.cat(self._visual, dim=1) if self._visual else None,
                                    row_images=media_tokens, **self._media_state())
            if self.cache is None:
                self.cache = DynamicCache(config=model.lm.config)
            if media_per_step is not None and encoded:
                return None
        end = min(self.done + chunk, self.length)
        ids = self.input_ids[None, self.done:end]  # (1, c)
        kwargs: dict[str, Any] = {lm_cache_argument(model.lm): self.cache}
        if self.prompt_logprobs is None:
            kwargs.update(lm_last_logits_only(model.lm))
        if lm_takes_position_ids(model.lm):
            kwargs["position_ids"] = torch.arange(self.done, end, device=self.device)[None]
        with model.conditioned(self.ctx):
            out = model.lm(input_ids=ids, attention_mask=torch.ones(1, end, dtype=torch.long, device=self.device),
                           use_cache=True, **kwargs)
        if self.prompt_logprobs is not None:  # position t's logits give token t + 1 its log-probability
            following = self.input_ids[self.done + 1:end + 1]  # (c,) or (c - 1,) in the last chunk
            self._logprobs.append(token_logprobs(out.logits[0, :following.numel()], following,
                                                 max(self.prompt_logprobs, STORED_TOP)))  # for the cache too
        self.done = end
        if self.done < self.length:
            return None
        logprobs = TokenLogprobs.cat(self._logprobs) if self._logprobs else None  # tokens 1..T-1
        return self._finish(out.logits[0, -1], self._decode_media_kv(), logprobs)

    def _finish(self, logits: torch.Tensor, media_kv: Optional[list[MediaKV]],
                logprobs: Optional[TokenLogprobs] = None) -> PrefilledRow:
        """The prompt is in `self.cache` and its media state in `self.ctx`: store its blocks in the prefix cache and
        hand its row over."""
        self._store_prefix(logprobs)
        top = None if logprobs is None else logprobs.top(self.prompt_logprobs)
        return PrefilledRow(self.cache, self.length, media_kv, self.ctx.decode_index.clone(),
                            None if self.ctx.decode_count is None else self.ctx.decode_count.clone(),
                            logits, self.cached_tokens, top)

    def block_keys(self) -> list[bytes]:
        """The prefix cache's key of each whole block of the prompt ([] without a prefix cache), computed once and
        without looking anything up: prompts whose first keys are equal begin alike. Raises ValueError for a prompt
        with fewer media than `<image>` tokens."""
        cache = self.prefix_cache
        if cache is not None and self._keys is None:
            media_token = self.model.config.media_token_id
            self._keys = cache.keys(self.input_ids, media_token, self.images, self.num_frames)
            self._media_per_block = cache.media_per_block(self.input_ids, media_token, len(self._keys))
        return self._keys or []

    def _check_and_reuse(self) -> None:
        """Check the prompt's media tokens against its media; with a prefix cache, start after the longest run of
        stored blocks (leaving at least the last token to compute)."""
        self._checked = True
        self.model.check_media_tokens(self.input_ids[None],
                                      None if self.images is None else torch.tensor([self.total_media]))
        cache = self.prefix_cache
        if cache is None:
            return
        keys = self.block_keys()
        logprobs = self.prompt_logprobs is not None
        if logprobs and self.prompt_logprobs > STORED_TOP:  # more alternatives than blocks keep: all computed
            return
        hit = cache.lookup(keys, (self.length - 1) // cache.block, logprobs=logprobs)
        if hit is None:
            return
        # with logprobs, the last reused token runs again: its position's logits give the next token's
        reused = hit.tokens - 1 if logprobs else hit.tokens
        self.cache = DynamicCache(config=self.model.lm.config)
        for i, (k, v) in enumerate(hit.kv):
            self.cache.update(k[:, :, :reused], v[:, :, :reused], i)
        if hit.visual is not None:
            self._visual.append(hit.visual)
        if hit.logprobs is not None:
            self._logprobs.append(hit.logprobs)  # tokens 1..hit.tokens - 1
        self.done = self.cached_tokens = reused

    def _media_state(self) -> dict[str, Optional[torch.Tensor]]:
        """The media index (and, with references, the image count) after the reused tokens: where the first LM
        call of this prefill continues from."""
        if self.done == 0:
            return {}
        model = self.model
        ids = self.input_ids[None, :self.done]  # (1, done)
        index = compute_media_index(ids, model.config.media_token_id, references=model.references)  # (1, done)
        count = (ids == model.config.media_token_id).sum(dim=1) if model.references is not None else None
        return {"last_media_index": index[:, -1], "media_count": count}

    def _encode_media(self, per_step: Optional[int]) -> Optional[bool]:
        """Encode the next `per_step` media (all when None) into `self._visual`: None while media remain, else
        whether this call encoded any."""
        if self.images is None:
            return False
        total = self.total_media
        start = self.media_done
        end = total if per_step is None else min(total, start + per_step)
        if end > start:
            frames = None if self.num_frames is None else self.num_frames[:, start:end]
            self._visual.append(self.model.encode_media(self.images[:, start:end].to(self.device),
                                                        torch.tensor([end - start]), frames,
                                                        vision_cache=self.vision_cache))  # (1, n, R, Dv)
        return end > start if end >= total else None

    def _store_prefix(self, logprobs: Optional[TokenLogprobs]) -> None:
        """Give the prompt's whole blocks to the prefix cache (those it holds already are only touched), with the
        prompt's log-probabilities when this prefill computed them."""
        cache = self.prefix_cache
        if cache is None or not self._keys:
            return
        kv = [(layer.keys, layer.values) for layer in self.cache.layers]  # (1, h, T, d)
        cache.insert(self._keys, kv, self.ctx.visual, self._media_per_block, logprobs)

    def _decode_media_kv(self) -> Optional[list[MediaKV]]:
        ctx, model = self.ctx, self.model
        if ctx.visual is None or model.decodes_no_image:
            return None
        kvs = []
        for j, block in enumerate(model.xattn):
            if model.decodes_all_images:
                kvs.append(ctx.kv_for(j, block, 1))  # (1, N, R, h, d)
            else:
                kvs.append(ctx.last_image_kv_for(j, block, 1))  # (1, 1, R, h, d): the prompt's last image
        return kvs


def _padding_id(model: Flamingo) -> int:
    """A token id for left padding: never a media or reference token (they would move the rows' media index)."""
    config, lm_config = model.config, model.lm.config
    special = {config.media_token_id}
    if model.references is not None:
        special |= set(range(model.references[0], model.references[0] + model.references[1]))
    eos = lm_config.eos_token_id[0] if isinstance(lm_config.eos_token_id, list) else lm_config.eos_token_id
    return next(c for c in (lm_config.pad_token_id, eos, 0, 1, 2) if isinstance(c, int) and c not in special)


def can_prefill_together(model: Flamingo, length: int) -> bool:
    """Whether prompts of up to `length` tokens can share one left-padded prefill: the LM takes position ids (so
    padding moves no position) and its cache keeps every position of the call (a sliding window shorter than the
    call would keep padding in place of a row's first tokens)."""
    if not lm_takes_position_ids(model.lm):
        return False
    window = getattr(model.lm.config, "sliding_window", None)  # the layers' cache keeps window - 1 positions
    return not any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.lm.config).layers) \
        or (isinstance(window, int) and length < window - 1)


def _encode_together(model: Flamingo, prefills: Sequence[Prefill]) -> Optional[torch.Tensor]:
    """All the prompts' media through one `encode_media` call (padded to the most media and frames; only real frames
    reach the tower, through the first prompt's vision cache) -> (B, N, R, Dv), or None without media."""
    owners = [p for p in prefills if p.total_media]
    if not owners:
        return None
    media = max(p.total_media for p in owners)
    frames = max(p.images.shape[2] for p in owners)
    first = owners[0].images
    images = first.new_zeros(len(prefills), media, frames, *first.shape[3:])  # (B, N, F, C, H, W)
    num_frames = torch.ones(len(prefills), media, dtype=torch.long)
    num_media = torch.tensor([p.total_media for p in prefills])
    for i, p in enumerate(prefills):
        n, f = p.total_media, p.images.shape[2] if p.total_media else 0
        if n:
            images[i, :n, :f] = p.images[0, :n]
            num_frames[i, :n] = p.num_frames[0, :n].cpu() if p.num_frames is not None else f
    return model.encode_media(images.to(prefills[0].device), num_media, num_frames,
                              vision_cache=owners[0].vision_cache)


@torch.no_grad()
def prefill_together(model: Flamingo, prefills: Sequence[Prefill]) -> list[PrefilledRow]:
    """Prefill fresh prompts (`Prefill.fresh`) in one left-padded LM call and hand each its own row: its cache (the
    call's rows without their padding, copied), its images' K/V, its media state, its last logits; the prefix
    cache gets each prompt's blocks. A row equals its prompt prefilled alone up to the rounding of the batched
    matmuls (tests/test_prefill_together.py). One pass over the weights and one vision tower call for all: on one
    CPU thread 2-16 prompts take 0.48-0.77x their time one at a time (bench/README.md, "Prompts prefilled
    together")."""
    if not prefills or not all(p.fresh for p in prefills):
        raise ValueError("prefill_together takes fresh prompts: prepared, nothing run or reused, no logprobs")
    lengths = [p.length for p in prefills]
    longest, rows = max(lengths), len(prefills)
    if not can_prefill_together(model, longest):
        raise ValueError("this LM cannot prefill prompts together (no position ids, or a sliding window shorter "
                         "than the prompts)")
    device = prefills[0].device
    visual = _encode_together(model, prefills)  # (B, N, R, Dv) or None
    visuals = [None if visual is None or not p.total_media else visual[i:i + 1, :p.total_media].clone()
               for i, p in enumerate(prefills)]  # (1, n, R, Dv) each: a row's own (the prefix cache keeps them)
    ids = torch.full((rows, longest), _padding_id(model), dtype=torch.long, device=device)  # (B, T) left-padded
    mask = torch.zeros(rows, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prefills):
        ids[i, longest - p.length:] = p.input_ids
        mask[i, longest - p.length:] = 1
    cache = DynamicCache(config=model.lm.config)
    ctx = MediaContext(Phase.PREFILL, visual)
    kwargs: dict[str, Any] = {lm_cache_argument(model.lm): cache, **lm_last_logits_only(model.lm)}
    with model.conditioned(ctx):
        out = model.lm(input_ids=ids, attention_mask=mask, position_ids=model.position_ids_for(mask), use_cache=True,
                       **kwargs)
    done = []
    for i, p in enumerate(prefills):
        start = longest - p.length
        p.cache = DynamicCache(config=model.lm.config)
        for j, layer in enumerate(cache.layers):  # copies: the row outlives the call's cache (prefix cache, batch)
            p.cache.update(layer.keys[i:i + 1, :, start:].clone(), layer.values[i:i + 1, :, start:].clone(), j)
        p.ctx = MediaContext(Phase.PREFILL, visuals[i], decode_index=ctx.decode_index[i:i + 1],
                             decode_count=None if ctx.decode_count is None else ctx.decode_count[i:i + 1])
        p.done, p._visual = p.length, [] if visuals[i] is None else [visuals[i]]
        media_kv = None
        if visuals[i] is not None and not model.decodes_no_image:
            n = visuals[i].shape[1]
            media_kv = []
            for j, block in enumerate(model.xattn):
                kv = ctx.kv_for(j, block, rows) if model.decodes_all_images else ctx.last_image_kv_for(j, block, rows)
                keep = n if model.decodes_all_images else 1
                media_kv.append(MediaKV(kv.k[i:i + 1, :keep].clone(), kv.v[i:i + 1, :keep].clone()))
        done.append(p._finish(out.logits[i, -1], media_kv))
    return done
