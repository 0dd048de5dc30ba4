"""Continuous batching: rows that join and leave a running decode batch (what `flamingo serve` decodes with).

HF `generate` cannot take new rows mid-run, so a server runs its own loop over two model-level steps:
- `Prefill` (model/prefill.py): one prompt alone, in chunks; it leaves a `PrefilledRow`.
- `DecodeBatch`: the running rows. Each row keeps its own LM cache rows, its own visual K/V per block (the last
  image's `(1, R, h, d)`, or all its images' when the model decodes with references), its own media index and its own
  position. `add` copies a prefilled row into a free row (the rows stay packed at the front: `remove` moves the last
  row into the freed one), `step` feeds one token per row.

The LM cache of the batch is preallocated per decoder layer, `(rows, heads, length, head_dim)`, and grows by doubling.
Rows are left-padded to one shared length (a joining prompt longer than the batch's length shifts the others right;
padding that every row has is trimmed when rows leave); the attention mask hides the padding and position ids count
each row's real tokens, so padding and row order change nothing but float rounding (docs/serve.md): a row decodes the
tokens it decodes alone (tests/test_serve_batching.py). Decoding never concatenates caches (HF's dynamic cache copies
the whole cache at every step); a join copies one row's prompt.

A static batch (`static=True`, or `compile_backend` for `torch.compile`d steps: `flamingo serve --compile`) runs each
step in one of a few shapes: attention over a power-of-two window of positions (at least 64, the empty ones masked;
the buffers start at zero), the write position a tensor, the mask the LM's own for a static cache
(`create_masks_for_generate`) made before the step. The row count is the compiled step's one dynamic dimension, so a
step compiles once per (one row or more, window, media) shape, never per token or per row count; on a GPU the rows
are also padded with idle ones to a power of two, since a CUDA graph is recorded per row count. Its tokens are those
of the dynamic steps (tests/test_serve_batching.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from ..runtime.compat import (
    CONTINUOUS_BATCHING,
    STATIC_CACHE_MASK_HOOK,
    TRANSFORMERS_VERSION,
    lm_cache_argument,
    lm_takes_position_ids,
)
from .backbones import lm_max_positions
from .context import MediaContext, Phase
from .prefill import PrefilledRow
from .xattn import MediaKV

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotations only
    from .flamingo import Flamingo


class _Shape:
    """The rows and shared length of a `DecodeBatch`, read by all its cache layers during one LM call. A static
    batch's step writes at `position`, a tensor (the length as a Python number would make a compiled step
    recompile at every token), and attends over the first `window` positions."""

    def __init__(self, static: bool = False, device: Optional[torch.device] = None) -> None:
        self.rows = 0
        self.length = 0
        self.static = static
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # static: (1,) the step's position
        self.window = 0  # static: the positions a step attends over (a power of two, at most the buffers' length)


class _RowsLayer(CacheLayerMixin):
    """One decoder layer's K/V for the rows of a `DecodeBatch`: preallocated buffers `(rows_cap, h, len_cap, d)`;
    an LM call writes its tokens at the shared length and attends to `[:rows, :, :length + T]`."""

    is_sliding = False

    def __init__(self, shape: _Shape) -> None:
        super().__init__()
        self.shape = shape

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a DecodeBatch allocates its cache when its first row joins")

    def allocate(self, rows: int, length: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """(Re)allocate for `rows` x `length`, keeping what the old buffers held. The rest stays uninitialised: a
        live row's positions below the batch's length are always written before an LM call reads them (`add`,
        `step`, `_shift`, `remove`), and nothing else is read. (Zero-filling the new buffers made a CPU batch growing
        from 16 to 32 rows stall ~1.5 s on page faults: bench/README.md, "Prefix cache".) A static batch's step
        reads every position, masked or not, so its buffers start at zero (a masked NaN would still poison the
        attention's weighted sum)."""
        h, d_k, d_v = like_k.shape[1], like_k.shape[-1], like_v.shape[-1]
        new = _zeros if self.shape.static else _uninitialized
        keys = new(like_k, (rows, h, length, d_k))
        values = new(like_v, (rows, like_v.shape[1], length, d_v))
        if self.is_initialized:
            r, n = min(rows, self.keys.shape[0]), min(length, self.keys.shape[2])
            keys[:r, :, :n] = self.keys[:r, :, :n]
            values[:r, :, :n] = self.values[:r, :, :n]
        if self.shape.static and keys.is_cuda:  # CUDA graphs replay on fixed addresses
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shape.static:  # one token per row at `position`; attends over the window (the mask hides the rest)
            rows, window = key_states.shape[0], self.shape.window
            # written into the whole buffers by index, not through a view of them: a compiled step would copy the
            # whole buffers to write into a view (bench/README.md, "Compiled decode steps in the server")
            row = torch.arange(rows, device=key_states.device)[:, None]  # (rows, 1)
            head = torch.arange(key_states.shape[1], device=key_states.device)[None]  # (1, h)
            self.keys.index_put_((row, head, self.shape.position), key_states[:, :, 0])  # (rows, h, d)
            self.values.index_put_((row, head, self.shape.position), value_states[:, :, 0])
            return self.keys[:rows, :, :window], self.values[:rows, :, :window]
        rows, start = self.shape.rows, self.shape.length
        end = start + key_states.shape[-2]
        self.keys[:rows, :, start:end] = key_states
        self.values[:rows, :, start:end] = value_states
        return self.keys[:rows, :, :end], self.values[:rows, :, :end]

    @property
    def is_compileable(self) -> bool:  # transformers then always makes the step's mask (no causal shortcut)
        return self.shape.static

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.shape.static:
            return self.shape.window, 0
        return self.shape.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.shape.length

    def get_max_length(self) -> int:
        return self.shape.window if self.shape.static else -1

    def get_max_cache_shape(self) -> int:  # get_max_length's older name, still abstract in transformers 5.4
        return self.get_max_length()


class DecodeBatch:
    """The rows being decoded: add a prefilled row, step them all by one token, remove a finished one.

    Row i of every buffer belongs to the same request; rows 0..rows-1 are live. Not thread-safe: one thread (the
    server's engine loop) owns a batch."""

    def __init__(self, model: Flamingo, max_rows: int, *, static: bool = False,
                 compile_backend: Optional[str] = None, pad_rows: Optional[bool] = None) -> None:
        """static: steps of a few fixed shapes (attended positions padded to a power of two, the write position a
        tensor), what a compiled step needs; compile_backend: run the LM's step under `torch.compile` with that
        backend (static steps, the row count dynamic; "inductor" runs CUDA graphs on a GPU); pad_rows: static steps
        also pad the rows to a power of two with idle ones (default: on a GPU, where CUDA graphs record one graph
        per row count)."""
        if not CONTINUOUS_BATCHING:
            raise RuntimeError(f"continuous batching (flamingo serve) needs transformers >= 5.4, not "
                               f"{TRANSFORMERS_VERSION} (docs/compat.md)")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        static = static or compile_backend is not None
        if static:
            check_static_steps(model)
        self.model, self.max_rows = model, max_rows
        self.device = next(model.lm.parameters()).device
        _check_full_attention(DynamicCache(config=model.lm.config))
        if not model.pads_exactly():  # rows of several lengths share the batch under per-row attention masks
            raise ValueError(f"continuous batching runs rows of several lengths under per-row attention masks, but "
                             f"this LM ({type(model.lm).__name__}) computes a left-padded prompt otherwise than the "
                             "prompt alone (it ignores the attention mask, or its recurrent state runs over the "
                             "padding): it cannot be served; run generate, or flamingo eval with --batch-size 1")
        self._shape = _Shape(static, self.device)
        if static and self.device.type == "cuda":
            torch._dynamo.mark_static_address(self._shape.position)
        self._lm_step: Callable[..., torch.Tensor] = self._call_lm
        # dynamo's settings for the compiled step, one patch object for every step: each `config.patch` holds its own
        # ContextVar, which stays in the thread's context once set (one patch per step grew a server's memory)
        self._dynamo_patch: Any = contextlib.nullcontext()
        self._compiles = compile_backend is not None
        self._pad_rows = static and (self.device.type == "cuda" if pad_rows is None else pad_rows)
        self._compiled_shapes: set[tuple[int, int, bool]] = set()  # (1 or 2+ rows, window, media) compiled so far
        if compile_backend is not None:
            mode = "reduce-overhead" if self.device.type == "cuda" and compile_backend == "inductor" else None
            self._lm_step = torch.compile(self._call_lm, backend=compile_backend, mode=mode, fullgraph=True)
            # one graph per (1 row or more, window, media) shape: more than torch's default of 8 per function; the
            # row count is the only dynamic dimension (marked), the window's never becomes one
            limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            self._dynamo_patch = torch._dynamo.config.patch(**{limit: 64, "automatic_dynamic_shapes": False})
        self._layers: list[_RowsLayer] = []
        self.cache = Cache(layers=[])
        self._cap_rows = self._cap_len = 0
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (rows_cap, len_cap)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (rows_cap,) real tokens per row
        self.media_k: list[torch.Tensor] = []  # per block (rows_cap, N_cap, R, h, d)
        self.media_v: list[torch.Tensor] = []
        self.decode_index = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # (rows_cap, 1)
        self.decode_count = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # (rows_cap, 1)
        # the LM forward's signature, read once (not per decode step)
        self._takes_positions = lm_takes_position_ids(model.lm)
        self._cache_argument = lm_cache_argument(model.lm)
        # the positions the LM was built for: an LM whose position bias is sized by them (MPT's ALiBi) refuses a step
        # over more keys, padding included, though every row's own tokens fit
        self._position_limit = lm_max_positions(model.lm)

    @property
    def rows(self) -> int:
        return self._shape.rows

    @property
    def length(self) -> int:
        return self._shape.length

    @property
    def compiled_shapes(self) -> set[tuple[int, int, bool]]:
        """The (1 row, or 2 for two or more; window; with media) shapes a compiled batch has compiled so far."""
        return set(self._compiled_shapes)

    def free_rows(self) -> int:
        return self.max_rows - self.rows

    # ------------------------------------------------------------------------------------------------ storage
    def _grow(self, rows: int, length: int, like: Optional[DynamicCache] = None) -> None:
        """Make room for `rows` rows of `length` positions (each capacity doubles when it must grow). A static batch
        holds `max_rows` rows from the start and a power of two of positions: a compiled step's buffers change shape
        only when the length doubles."""
        if rows <= self._cap_rows and length <= self._cap_len:
            return
        cap_rows = self._cap_rows if rows <= self._cap_rows else min(self.max_rows, max(rows, 2 * self._cap_rows, 4))
        cap_len = max(length, 2 * self._cap_len if length > self._cap_len else self._cap_len, 64)
        if self._shape.static:
            cap_rows, cap_len = self.max_rows, _power_of_two(cap_len)
        if not self._layers:
            if like is None:
                raise RuntimeError("the batch's cache is allocated from its first row's prefill cache")
            _check_full_attention(like)
            self._layers = [_RowsLayer(self._shape) for _ in like.layers]
            self.cache.layers = list(self._layers)
        for layer, src in zip(self._layers, like.layers if like is not None else self._layers):
            layer.allocate(cap_rows, cap_len, src.keys if not layer.is_initialized else layer.keys,
                           src.values if not layer.is_initialized else layer.values)
        mask = torch.zeros(cap_rows, cap_len, dtype=torch.long, device=self.device)
        mask[:self._cap_rows, :self._cap_len] = self.mask
        positions = torch.zeros(cap_rows, dtype=torch.long, device=self.device)
        positions[:self._cap_rows] = self.positions
        self.mask, self.positions = mask, positions
        self._cap_rows, self._cap_len = cap_rows, cap_len
        self._grow_media(cap_rows, None)

    def _grow_media(self, rows: int, like: Optional[list[MediaKV]]) -> None:
        """Media buffers for `rows` rows holding at least as many images as `like` (per block (1, N, R, h, d))."""
        need_n = 0 if like is None else like[0].k.shape[1]
        have_rows = self.decode_index.shape[0]
        have_n = self.media_k[0].shape[1] if self.media_k else 0
        if rows <= have_rows and need_n <= have_n:
            return
        if like is None and not self.media_k:  # no image seen yet: only the index buffers
            self.decode_index = _grown(self.decode_index, (rows, 1))
            self.decode_count = _grown(self.decode_count, (rows, 1))
            return
        n = max(need_n, have_n)
        for j in range(len(self.media_k) or len(like)):
            ref = like[j] if like is not None else MediaKV(self.media_k[j], self.media_v[j])
            shape = (rows, n, *ref.k.shape[2:])
            old_k = self.media_k[j] if j < len(self.media_k) else None
            old_v = self.media_v[j] if j < len(self.media_v) else None
            k = ref.k.new_zeros(shape)
            v = ref.v.new_zeros(shape)
            if old_k is not None:
                k[:old_k.shape[0], :old_k.shape[1]] = old_k
                v[:old_v.shape[0], :old_v.shape[1]] = old_v
            if j < len(self.media_k):
                self.media_k[j], self.media_v[j] = k, v
            else:
                self.media_k.append(k)
                self.media_v.append(v)
        self.decode_index = _grown(self.decode_index, (rows, 1))
        self.decode_count = _grown(self.decode_count, (rows, 1))

    def _shift(self, offset: int) -> None:
        """Move every live row's columns by `offset` (> 0: right, making room for a longer prompt; < 0: left,
        dropping padding every row has)."""
        rows, length = self.rows, self.length
        new_length = length + offset
        src = slice(max(0, -offset), length)
        dst = slice(max(0, offset), new_length)
        for layer in self._layers:
            layer.keys[:rows, :, dst] = layer.keys[:rows, :, src].clone()
            layer.values[:rows, :, dst] = layer.values[:rows, :, src].clone()
            if offset > 0:  # the new padding: masked, but read by attention (0 x NaN would be NaN)
                layer.keys[:rows, :, :offset] = 0
                layer.values[:rows, :, :offset] = 0
        self.mask[:rows, dst] = self.mask[:rows, src].clone()
        if offset > 0:
            self.mask[:rows, :offset] = 0
        self._shape.length = new_length

    # ------------------------------------------------------------------------------------------------ rows
    @torch.no_grad()
    def add(self, row: PrefilledRow, copies: int = 1) -> list[int]:
        """Copy a prefilled prompt into `copies` new rows (several choices of one request share its prefill);
        returns their row indices."""
        if copies > self.free_rows():
            raise RuntimeError(f"{copies} rows asked, {self.free_rows()} free")
        p = row.length
        first = self.rows
        self._grow(first + copies, max(self.length, p) + 1, like=row.cache)
        if p > self.length:
            self._shift(p - self.length)
        start = self.length - p
        for layer, src in zip(self._layers, row.cache.layers):
            layer.keys[first:first + copies, :, :start] = 0
            layer.values[first:first + copies, :, :start] = 0
            layer.keys[first:first + copies, :, start:self.length] = src.keys[0]
            layer.values[first:first + copies, :, start:self.length] = src.values[0]
        self.mask[first:first + copies, :start] = 0
        self.mask[first:first + copies, start:self.length] = 1
        self.positions[first:first + copies] = p
        self._grow_media(self._cap_rows, row.media_kv)
        for j in range(len(self.media_k)):
            self.media_k[j][first:first + copies] = 0
            self.media_v[j][first:first + copies] = 0
            if row.media_kv is not None:
                n = row.media_kv[j].k.shape[1]
                self.media_k[j][first:first + copies, :n] = row.media_kv[j].k[0]
                self.media_v[j][first:first + copies, :n] = row.media_kv[j].v[0]
        self.decode_index[first:first + copies] = row.decode_index
        self.decode_count[first:first + copies] = 0 if row.decode_count is None else row.decode_count
        self._shape.rows = first + copies
        return list(range(first, first + copies))

    @torch.no_grad()
    def remove(self, i: int) -> None:
        """Free row i: the last row moves into it (remove several rows from the highest index down)."""
        last = self.rows - 1
        if not 0 <= i <= last:
            raise IndexError(f"row {i} is not live ({self.rows} rows)")
        if i != last:
            for layer in self._layers:
                layer.keys[i, :, :self.length] = layer.keys[last, :, :self.length]
                layer.values[i, :, :self.length] = layer.values[last, :, :self.length]
            for buffer in (self.mask, self.positions, self.decode_index, self.decode_count, *self.media_k,
                           *self.media_v):
                buffer[i] = buffer[last]
        self._shape.rows = last
        if last == 0:
            self._shape.length = 0
            return
        self._trim((self.length + 3) // 4)  # a quarter of the length or more

    def _trim(self, at_least: int) -> None:
        """Drop the left padding every live row has, when it is at least `at_least` positions."""
        pad = self.length - int(self.positions[:self.rows].max())
        if pad > 0 and pad >= at_least:
            self._shift(-pad)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per live row, tokens (rows,) -> the next logits (rows, V)."""
        rows, length = self.rows, self.length
        if rows == 0:
            raise RuntimeError("no rows to decode")
        if tokens.shape != (rows,):
            raise ValueError(f"one token per row: expected ({rows},), got {tuple(tokens.shape)}")
        if self._position_limit is not None and length + 1 > self._position_limit:
            self._trim(1)  # every row's tokens fit the limit (the engine's check); the shared padding need not
            length = self.length
        self._grow(rows, length + 1)
        self.mask[:rows, length] = 1
        ids = tokens.to(self.device)[:, None]  # (rows, 1)
        if self._shape.static:  # attended positions up to a power of two (and, on a GPU, rows): a few shapes
            run = min(self._cap_rows, _power_of_two(rows)) if self._pad_rows else rows
            self._shape.window = min(self._cap_len, max(64, _power_of_two(length + 1)))
            self.mask[rows:run, :length] = 0  # an idle row sees its own token only (no row without keys)
            self.mask[rows:run, length] = 1
            ids = F.pad(ids, (0, 0, 0, run - rows))  # (run, 1)
            self._shape.position.fill_(length)
        else:
            run = rows
        ctx = MediaContext(Phase.DECODE, None, decode_index=self.decode_index[:run],
                           decode_count=self.decode_count[:run] if self.model.references is not None else None,
                           decode_kv=[])
        if self.media_k and bool((self.decode_index[:rows] > 0).any()):  # else no block attends: skipped
            ctx.decode_kv = [MediaKV(k[:run], v[:run]) for k, v in zip(self.media_k, self.media_v)]
        mask = self.mask[:run, :length + 1]  # (run, length + 1)
        positions = self.positions[:run, None] if self._takes_positions else None
        if self._shape.static:  # the LM's own 4D mask over the whole buffer, made outside the compiled step
            mask = self._mask_for(ids, mask, positions)
        if self._compiles:  # one graph for every row count but 1 (torch specializes size-1 dimensions)
            masks = mask.values() if isinstance(mask, dict) else (mask,)  # Qwen2's, Gemma's: one per layer type
            for t in (ids, *masks, positions, *ctx.decode_tensors()):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        shape = (min(run, 2), self._shape.window, bool(ctx.decode_kv))
        first = self._compiles and shape not in self._compiled_shapes
        if first:  # the step stalls while it compiles: say so
            log.info("compiling the decode step for %s x %d positions (%s media)",
                     "1 row" if run == 1 else "2 or more rows", shape[1], "with" if shape[2] else "without")
            started = time.perf_counter()
        with self.model.conditioned(ctx), self._dynamo_patch:
            logits = self._lm_step(ids, mask, positions)  # (run, V)
        if first:
            self._compiled_shapes.add(shape)
            log.info("compiled in %.1f s", time.perf_counter() - started)
        self._shape.length = length + 1
        self.positions[:rows] += 1
        return logits[:rows].clone() if self.device.type == "cuda" else logits[:rows]  # a CUDA graph's output is
        # overwritten by its next replay

    def _call_lm(self, ids: torch.Tensor, mask: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        """One LM call of the batch's rows under the active context -> the next logits (rows, V)."""
        kwargs: dict[str, Any] = {self._cache_argument: self.cache}
        if positions is not None:
            kwargs["position_ids"] = positions
        return self.model.lm(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs).logits[:, -1]

    def _mask_for(self, ids: torch.Tensor, mask: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        """A static step's attention mask as the LM builds it for a static cache (`create_masks_for_generate`, the
        LM's own where it has one): the padding of `mask (rows, length + 1)` and the empty slots after it hidden."""
        from transformers.masking_utils import create_masks_for_generate  # transformers >= 5.25 (check_static_steps)

        lm = self.model.lm
        make = getattr(lm, "create_masks_for_generate", create_masks_for_generate)
        embeds = torch.empty((ids.shape[0], 1, 0), dtype=next(lm.parameters()).dtype, device=self.device)
        return make(config=lm.config, inputs_embeds=embeds, attention_mask=mask, cache=self.cache,
                    position_ids=positions)


def check_static_steps(model: Flamingo) -> None:
    """Static (compileable) decode steps need transformers' mask hook for static caches and an LM transformers can
    compile with one; a clear error otherwise."""
    if not STATIC_CACHE_MASK_HOOK:
        raise ValueError(f"compiled decode steps in a batch need transformers >= 5.25, not {TRANSFORMERS_VERSION}")
    if not getattr(type(model.lm), "_can_compile_fullgraph", False):
        raise ValueError(f"{type(model.lm).__name__} cannot decode with a static cache (transformers marks it not "
                         "compileable, MPT among them): serve without compile")
    if not lm_takes_position_ids(model.lm) and not hasattr(model.lm, "create_masks_for_generate"):
        # (MosaicGPT takes none, but its positions are in the ALiBi bias its mask hook makes outside the step)
        raise ValueError(f"{type(model.lm).__name__} takes no position_ids: its positions would come from the "
                         "cache's length, which a compiled step cannot read; serve without compile")


def _check_full_attention(cache: Cache) -> None:
    """Rows of a batch keep every position's K/V: LMs whose caches hold sliding windows or linear-attention states
    (HF picks their layer classes from the config) are refused."""
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(f"continuous batching needs full-attention cache layers; this LM's cache has {odd} "
                         "(sliding-window or linear attention)")


def _uninitialized(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A K/V buffer whose contents are never read before they are written (tests fill it with NaN to check)."""
    return like.new_empty(shape)


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _zeros(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return like.new_zeros(shape)


def _grown(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` zero-padded to `shape` (each dimension at least its old size)."""
    if tuple(t.shape) == shape:
        return t
    out = t.new_zeros(tuple(max(a, b) for a, b in zip(shape, t.shape)))
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out
