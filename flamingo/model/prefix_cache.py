"""`PrefixCache`: prompts that begin alike (the same few-shot demonstrations, images included) reuse each other's
prefill.

A prompt is cut into blocks of `block` tokens. Block b's key chains the keys before it: a BLAKE2b digest of block
b-1's key, block b's token ids, and the pixel digests of the media whose `<image>` token falls in block b. So a key
names everything the block's K/V depend on: every earlier token and every earlier image (the cross-attention makes the
text after an image depend on its pixels; causal attention, the media index and the visual K/V read nothing later).
Block b stores the LM's K/V of its tokens, per decoder layer `(1, heads, block, head_dim)`, and the visual tokens of its
media `(n, R, Dv)`; a prompt whose first m blocks are stored starts its prefill at token m·block with those K/V and
visual tokens, encodes only its later media and runs the LM on its later tokens (at least its last one: the next
token's logits come from an LM call).

Stored K/V were made in another prompt's prefill, in other chunks: a prompt prefilled from them equals the prompt
prefilled alone up to float rounding (as chunked prefill does; tests/test_prefix_cache.py).

A block may also keep its tokens' log-probabilities (each under the logits of the position before it, with that
position's `STORED_TOP` likeliest tokens), stored by a prefill that computed them (a server's `echo` with
`logprobs`): they depend on nothing outside the block's key either, so a later prompt asking for its prompt's
log-probabilities reuses such blocks (and only such), recomputing from the last reused token on, whose position's
logits give the next token its log-probability.

A server's clients share the cache. A request with a `cache_salt` uses the view `salted` gives: the same store, its
chain keyed under the salt (a keyed BLAKE2b), so its blocks are found only by prompts sent with the same salt, and a
client cannot learn from `cached_tokens` (or timing) whether another sent a prompt.

The blocks live in one least-recently-used store under a byte budget. A prompt's blocks are touched from its last to
its first, so a block is always more recent than the blocks that extend it: eviction takes chains from their ends and
never leaves a block unreachable behind an evicted one. The model owns nothing of it: the server's engine owns the
cache and hands it to each `Prefill`.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..runtime.lru import LRU, budget_bytes, nbytes
from .feature_cache import VisionFeatureCache, salt_key
from .logprobs import TokenLogprobs

DEFAULT_BLOCK = 16  # tokens per block: a hit reuses whole blocks, a prompt differing at token t reuses t // 16 blocks
STORED_TOP = 5  # alternatives kept per position with a block's log-probabilities (OpenAI's completions allow 5)


@dataclass
class CachedBlock:
    """One block's K/V per decoder layer, (1, h, block, d) each, the visual tokens of its media (n, R, Dv), and
    maybe its tokens' log-probabilities (block 0: of its tokens but the first)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    visual: Optional[torch.Tensor]
    logprobs: Optional[TokenLogprobs] = None

    @property
    def nbytes(self) -> int:
        return sum(nbytes(k) + nbytes(v) for k, v in self.kv) + (0 if self.visual is None else nbytes(self.visual)) \
            + (0 if self.logprobs is None else self.logprobs.nbytes)


@dataclass
class PrefixHit:
    """What a prompt found: its first `tokens` tokens' K/V per layer (1, h, tokens, d), the visual tokens of the
    media among them (1, M, R, Dv) (None: no medium), and, when asked for, the log-probabilities of tokens
    1..tokens-1."""

    tokens: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    visual: Optional[torch.Tensor]
    logprobs: Optional[TokenLogprobs] = None


class PrefixCache:
    """Prefilled blocks of earlier prompts under `max_bytes`; see the module's docstring."""

    def __init__(self, max_bytes: int, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"a prefix block holds at least 1 token, got {block}")
        self.block = block
        self.store: LRU[bytes, CachedBlock] = LRU(max_bytes, size_of=lambda b: b.nbytes)
        self.salt = b""  # the BLAKE2b key of every block's key (`salted`); b"": the shared default

    def salted(self, salt: Optional[str]) -> "PrefixCache":
        """The cache as prompts sent with `salt` see it: its store, its block keys made under the salt (None: the
        cache itself)."""
        if not salt:
            return self
        view = copy.copy(self)
        view.salt = salt_key(salt)
        return view

    @classmethod
    def of_mib(cls, mib: float, block: int = DEFAULT_BLOCK) -> Optional["PrefixCache"]:
        """A cache of `mib` MiB, or None for 0 (off)."""
        size = budget_bytes(mib, "a prefix cache")
        return cls(size, block) if size else None

    @property
    def bytes(self) -> int:
        return self.store.size

    # ------------------------------------------------------------------------------------------------ keys
    def keys(self, input_ids: torch.Tensor, media_token_id: int, images: Optional[torch.Tensor] = None,
             num_frames: Optional[torch.Tensor] = None) -> list[bytes]:
        """One key per whole block of the prompt. input_ids (T,); images (1, N, F, C, H, W) in the order of the
        prompt's `<image>` tokens (one medium per token, as `Flamingo.check_media_tokens` requires), num_frames
        (1, N) real frames per medium (default F)."""
        ids = input_ids.detach().to("cpu", torch.long)
        at = (ids == media_token_id).nonzero().squeeze(1).tolist()  # each medium's token position
        digests = [self._media_digest(images, num_frames, j) for j in range(len(at))]
        keys, chain, j = [], b"", 0
        for b in range(ids.numel() // self.block):
            h = hashlib.blake2b(chain, digest_size=16, key=self.salt)
            h.update(ids[b * self.block:(b + 1) * self.block].numpy().tobytes())
            while j < len(at) and at[j] < (b + 1) * self.block:
                h.update(digests[j])
                j += 1
            chain = h.digest()
            keys.append(chain)
        return keys

    @staticmethod
    def _media_digest(images: Optional[torch.Tensor], num_frames: Optional[torch.Tensor], j: int) -> bytes:
        if images is None or j >= images.shape[1]:
            raise ValueError(f"the prompt's <image> token {j} has no medium")
        frames = images.shape[2] if images.ndim == 6 else 1
        if num_frames is not None:
            frames = int(num_frames[0, j])
        medium = images[0, j, :frames] if images.ndim == 6 else images[0, j:j + 1]  # (F, C, H, W)
        return VisionFeatureCache.key(medium.detach().to("cpu"))  # BLAKE2b of dtype, shape and bytes

    # ------------------------------------------------------------------------------------------------ use
    def lookup(self, keys: list[bytes], max_blocks: int, logprobs: bool = False) -> Optional[PrefixHit]:
        """The longest run of stored blocks from the prompt's first, at most `max_blocks` of them (with `logprobs`:
        of blocks that keep their log-probabilities); None when the first block is not stored."""
        m = 0
        while m < min(max_blocks, len(keys)) and keys[m] in self.store and \
                (not logprobs or self.store.peek(keys[m]).logprobs is not None):
            m += 1
        if m == 0:
            return None
        blocks = [self.store.get(keys[b]) for b in reversed(range(m))][::-1]  # touched last to first
        kv = [(torch.cat([b.kv[i][0] for b in blocks], dim=2), torch.cat([b.kv[i][1] for b in blocks], dim=2))
              for i in range(len(blocks[0].kv))]  # (1, h, m·block, d) per layer
        visual = [b.visual for b in blocks if b.visual is not None]
        found = TokenLogprobs.cat([b.logprobs for b in blocks]) if logprobs else None
        return PrefixHit(m * self.block, kv, torch.cat(visual)[None] if visual else None, found)

    def insert(self, keys: list[bytes], kv: list[tuple[torch.Tensor, torch.Tensor]],
               visual: Optional[torch.Tensor], media_per_block: list[int],
               logprobs: Optional[TokenLogprobs] = None) -> None:
        """Store the blocks that are not stored (a block the prompt reused but the budget evicted since included: the
        blocks after it could not be found without it), from a prefilled prompt's kv per layer
        (1, h, T, d) (T >= its whole blocks' end) and visual (1, N, R, Dv); touch all its blocks, last to first.
        logprobs: of the prompt's tokens 1..T-1 (at least `STORED_TOP` alternatives): every block keeps its own, a
        stored block that has none gains them."""
        starts = [sum(media_per_block[:b]) for b in range(len(keys))]  # the media before each block
        for b in reversed(range(len(keys))):  # last to first: parents more recent than the blocks extending them
            own = None if logprobs is None else \
                logprobs[max(1, b * self.block) - 1:(b + 1) * self.block - 1].top(STORED_TOP)
            stored = self.store.get(keys[b])
            if stored is not None:
                if own is not None and stored.logprobs is None:
                    self.store.put(keys[b], CachedBlock(stored.kv, stored.visual, _copy(own)))
                continue
            n, span = media_per_block[b], slice(b * self.block, (b + 1) * self.block)
            block_kv = [(k[:, :, span].clone(), v[:, :, span].clone()) for k, v in kv]  # (1, h, block, d)
            media = visual[0, starts[b]:starts[b] + n].clone() if n else None  # (n, R, Dv)
            self.store.put(keys[b], CachedBlock(block_kv, media, None if own is None else _copy(own)))

    def media_per_block(self, input_ids: torch.Tensor, media_token_id: int, blocks: int) -> list[int]:
        """How many `<image>` tokens each of the first `blocks` blocks holds."""
        ids = input_ids.detach().to("cpu")[:blocks * self.block]
        return (ids == media_token_id).view(blocks, self.block).sum(dim=1).tolist() if blocks else []


def _copy(logprobs: TokenLogprobs) -> TokenLogprobs:
    """A block's own tensors (a slice would keep the whole prompt's alive)."""
    return TokenLogprobs(logprobs.logprobs.clone(), logprobs.top_ids.clone(), logprobs.top_logprobs.clone())
