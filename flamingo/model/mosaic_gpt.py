"""MosaicGPT: the causal LM of OpenFlamingo-3B (anas-awadalla/mpt-1b-redpajama-200b and its -dolly twin), without
remote code.

MosaicML's earlier GPT (`model_type: mosaic_gpt`, the code MPT grew out of) is not in transformers, and transformers'
MPT cannot stand in for it: MosaicGPT's Linears and LayerNorms have biases, and the 1B model normalizes its queries
and keys ("QK LayerNorm": one LayerNorm each over the whole width, before the heads split). The blocks are pre-norm:
`x += attn(ln_1(x))`, `x += mlp(ln_2(x))`, the MLP a `mlp_ratio`x GELU; ALiBi instead of positions; the output head
is the token embedding (times `logit_scale` when set). The parameters keep the published checkpoint's names, so its
weights load as they are; `register()` makes transformers' Auto classes build this class for `mosaic_gpt`.

Options the published configs do not use are refused at build time (prefix-LM, learned positions) rather than
computed differently. Attention is one `scaled_dot_product_attention` per layer with one additive bias (ALiBi,
causality, padding) built once per forward and shared by every layer; with a static cache (compiled decoding), the
bias over all the cache's slots comes from `create_masks_for_generate`, which transformers' generate calls before the
compiled step.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..runtime.compat import OUTPUT_CACHE_FIELD, STATIC_CACHE_MASK_HOOK


class MosaicGPTConfig(PretrainedConfig):
    """The fields of MosaicGPT's `config.json`, under its names. Fields that only concern how MosaicML trained it
    (`attn_impl`, `init_*`, `param_init_fn`, `low_precision_layernorm`, which is a plain LayerNorm outside autocast)
    are kept as given and do not change the function."""

    model_type = "mosaic_gpt"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}

    def __init__(self, d_model: int = 2048, n_heads: int = 16, n_layers: int = 24, mlp_ratio: int = 4,
                 max_seq_len: int = 2048, vocab_size: int = 50432, attn_pdrop: float = 0.0,
                 resid_pdrop: float = 0.0, emb_pdrop: float = 0.0, attn_qk_ln: bool = False,
                 attn_clip_qkv: Optional[float] = None, softmax_scale: Optional[float] = None,
                 alibi: bool = True, alibi_bias_max: int = 8, logit_scale: Optional[Union[float, str]] = None,
                 no_bias: bool = False, embedding_fraction: float = 1.0, prefix_lm: bool = False,
                 layer_norm_eps: float = 1e-5, initializer_range: float = 0.02, use_cache: bool = True,
                 bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, **kwargs: Any) -> None:
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.n_layers, self.mlp_ratio = d_model, n_heads, n_layers, mlp_ratio
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.attn_pdrop, self.resid_pdrop, self.emb_pdrop = attn_pdrop, resid_pdrop, emb_pdrop
        self.attn_qk_ln, self.attn_clip_qkv, self.softmax_scale = attn_qk_ln, attn_clip_qkv, softmax_scale
        self.alibi, self.alibi_bias_max, self.logit_scale = alibi, alibi_bias_max, logit_scale
        self.no_bias, self.embedding_fraction, self.prefix_lm = no_bias, embedding_fraction, prefix_lm
        self.layer_norm_eps, self.initializer_range, self.use_cache = layer_norm_eps, initializer_range, use_cache
        kwargs["tie_word_embeddings"] = True  # MosaicGPT's head is its token embedding
        super().__init__(**kwargs)
        # set after the base class, which owns these on transformers 4 and no longer declares them on 5
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id

    def unsupported(self) -> list[str]:
        """The options this class does not compute (MosaicGPT's own code does): refused, never approximated."""
        found = []
        if self.prefix_lm:
            found.append("prefix_lm (bidirectional prefix attention)")
        if not self.alibi:
            found.append("learned positions (alibi: false)")
        return found

    def scale_of_logits(self) -> Optional[float]:
        if self.logit_scale is None:
            return None
        if self.logit_scale == "inv_sqrt_d_model":
            return 1 / math.sqrt(self.d_model)
        if isinstance(self.logit_scale, str):
            raise ValueError(f"logit_scale {self.logit_scale!r}: a number or 'inv_sqrt_d_model'")
        return float(self.logit_scale)


def alibi_slopes(n_heads: int, bias_max: float) -> torch.Tensor:
    """ALiBi's per-head slopes 2^-(k * bias_max / n) for k = 1..n, n the next power of two; for other head counts the
    odd then even ones of those (MosaicML's and transformers' MPT rule). Returns (H,)."""
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-torch.arange(1, n + 1, dtype=torch.float32) * (bias_max / n))
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def attention_bias(attention_mask: torch.Tensor, queries: int, slopes: torch.Tensor, dtype: torch.dtype,
                   keys: Optional[int] = None) -> torch.Tensor:
    """The additive attention bias of one forward: ALiBi, `-slope * (q - k)` for query slot q and key slot k, and the
    dtype's minimum where a query may not look (a later slot, a padded or an empty one).

    attention_mask (B, M): 1 on real tokens of the first M key slots (cache + this call); the last `queries` of them
    are this call's tokens. keys: the slots attention reads, M by default (a static cache's length: the slots after M
    are empty). MosaicGPT writes ALiBi relative to the last key, which differs per query by a constant softmax ignores;
    relative to the query the numbers near it stay small, so they keep their precision in bf16. Returns (B, H, Q, K)."""
    b, m = attention_mask.shape
    keys = m if keys is None else keys
    device = attention_mask.device
    distance = torch.arange(m - queries, m, device=device)[:, None] - torch.arange(keys, device=device)  # (Q, K)
    alibi = -slopes.to(device)[:, None, None] * distance.to(torch.float32)  # (H, Q, K)
    real = F.pad(attention_mask.bool(), (0, keys - m))  # (B, K): a static cache's empty slots are not real
    allowed = (distance >= 0)[None] & real[:, None, :]  # (B, Q, K)
    bias = alibi.to(dtype)[None].expand(b, -1, -1, -1)  # (B, H, Q, K)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class MosaicGPTAttention(nn.Module):
    def __init__(self, config: MosaicGPTConfig, layer_idx: int) -> None:
        super().__init__()
        d, bias = config.d_model, not config.no_bias
        self.n_heads, self.layer_idx = config.n_heads, layer_idx
        self.clip_qkv, self.dropout = config.attn_clip_qkv, config.attn_pdrop
        self.scale = config.softmax_scale or 1 / math.sqrt(d // config.n_heads)
        self.Wqkv = nn.Linear(d, 3 * d, bias=bias)
        if config.attn_qk_ln:  # over the whole width, before the heads split
            self.q_ln = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=bias)
            self.k_ln = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: Optional[Cache]) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.Wqkv(x)  # (B, T, 3D)
        if self.clip_qkv:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split(D, dim=-1)
        if hasattr(self, "q_ln"):
            q, k = self.q_ln(q).to(x.dtype), self.k_ln(k).to(x.dtype)
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, K, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class MosaicGPTMLP(nn.Module):
    def __init__(self, config: MosaicGPTConfig) -> None:
        super().__init__()
        d, bias = config.d_model, not config.no_bias
        self.mlp_up = nn.Linear(d, config.mlp_ratio * d, bias=bias)
        self.mlp_down = nn.Linear(config.mlp_ratio * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_down(F.gelu(self.mlp_up(x)))


class MosaicGPTBlock(nn.Module):
    """`x += attn(ln_1(x))`, `x += mlp(ln_2(x))`. `attention_mask` is the additive bias of `attention_bias` (the
    name transformers' decoder layers give their mask, so wrappers that pass it on by keyword keep working)."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int) -> None:
        super().__init__()
        bias = not config.no_bias
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=bias)
        self.attn = MosaicGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=bias)
        self.mlp = MosaicGPTMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, **kwargs: Any) -> torch.Tensor:
        x = hidden_states  # (B, T, D)
        x = x + self.resid_dropout(self.attn(self.ln_1(x), attention_mask, cache))
        return x + self.resid_dropout(self.mlp(self.ln_2(x)))


class MosaicGPTModel(nn.Module):
    """The body under MosaicGPT's key names (`transformer.wte`, `transformer.blocks.{i}`, `transformer.ln_f`)."""

    def __init__(self, config: MosaicGPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList(MosaicGPTBlock(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=not config.no_bias)


class MosaicGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MosaicGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["MosaicGPTBlock"]
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _supports_sdpa = True  # its attention is always scaled_dot_product_attention
    # a static cache and a compiled decode step: where transformers' generate asks the model for its mask
    _can_compile_fullgraph = STATIC_CACHE_MASK_HOOK

    def __init__(self, config: MosaicGPTConfig) -> None:
        super().__init__(config)
        problems = config.unsupported()
        if problems:
            raise ValueError(f"this MosaicGPT config uses {', '.join(problems)}, which flamingo's MosaicGPT does not "
                             "implement")
        self.transformer = MosaicGPTModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # tied to transformer.wte
        self.logit_scale = config.scale_of_logits()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _bias(self, attention_mask: torch.Tensor, queries: int, dtype: torch.dtype,
              keys: Optional[int] = None) -> torch.Tensor:
        # the slopes are made here, not kept in a buffer: transformers' loading leaves non-persistent buffers unset
        slopes = alibi_slopes(self.config.n_heads, self.config.alibi_bias_max)  # (H,)
        return attention_bias(attention_mask, queries, slopes, dtype, keys)

    def create_masks_for_generate(self, config: Any, inputs_embeds: torch.Tensor,
                                  attention_mask: Optional[torch.Tensor], cache: Optional[Cache] = None,
                                  past_key_values: Optional[Cache] = None, **kwargs: Any) -> torch.Tensor:
        """transformers' hook for a static (compileable) cache: the next forward's bias over all the cache's slots,
        made before the compiled step runs (it reads the cache's length on the host). Returns (B, H, T, max_len)."""
        cache = cache if cache is not None else past_key_values
        B, T = inputs_embeds.shape[:2]
        past = int(cache.get_seq_length())
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=inputs_embeds.device)
        return self._bias(attention_mask[:, -(past + T):], T, inputs_embeds.dtype, keys=cache.get_max_length())

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                logits_to_keep: Union[int, torch.Tensor] = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """The KV cache comes as `cache` (transformers >= 5.24's name) or `past_key_values`; `attention_mask` (B, K)
        covers the cached slots and this call's. Other keyword arguments transformers' generation passes
        (`cache_position`, `return_dict`, ...) are not needed: positions come from the cache and the mask."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"MosaicGPT takes a transformers Cache as its KV cache, not {type(cache).__name__}")
        if use_cache is None:  # a cache passed in is used (hub configs say use_cache: false)
            use_cache = cache is not None or self.config.use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache()
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T = x.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 4:  # the bias `create_masks_for_generate` made
            bias = attention_mask.to(x.dtype)  # (B, H, T, K)
        else:
            if getattr(cache, "is_compileable", False):
                raise ValueError("a static KV cache needs the (B, H, T, K) bias of `create_masks_for_generate` as the "
                                 "attention_mask (transformers' generate makes it)")
            past = cache.get_seq_length() if cache is not None else 0
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
            elif attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must cover the {past} cached and {T} "
                                 f"new slots of {B} rows")
            bias = self._bias(attention_mask, T, x.dtype)  # (B, H, T, K)
        fraction = self.config.embedding_fraction
        if fraction != 1:  # GLM-130B's embedding gradient shrink: the same values, a scaled gradient
            x = x * fraction + x.detach() * (1 - fraction)
        x = self.transformer.emb_drop(x)
        hidden_states = [] if output_hidden_states else None
        for block in self.transformer.blocks:
            if hidden_states is not None:
                hidden_states.append(x)
            x = block(x, attention_mask=bias, cache=cache)
        x = self.transformer.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(x[:, keep])  # (B, T', V)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=None if hidden_states is None
                                      else tuple(hidden_states), **{OUTPUT_CACHE_FIELD: cache})


def register() -> None:
    """Let `AutoConfig` / `AutoModelForCausalLM` build this class for `model_type: mosaic_gpt` (the hub checkpoint
    and saved conversions), without `trust_remote_code`. Idempotent."""
    AutoConfig.register(MosaicGPTConfig.model_type, MosaicGPTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MosaicGPTConfig, MosaicGPTForCausalLM, exist_ok=True)
