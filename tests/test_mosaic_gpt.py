"""MosaicGPT (OpenFlamingo-3B's LM) on our class: the function MosaicGPT's code computes, checked two ways.

- Against transformers' `MptForCausalLM` (an independent implementation of the same ALiBi transformer) where the two
  compute the same function: biases zero, no QK LayerNorm. Any head count, left padding, cached decoding.
- Against `mosaic_gpt_reference` below, MosaicGPT's forward written plainly from its code (MosaicML's `attention.py`
  and `mosaic_gpt.py`: scores, an ALiBi bias over `max_seq_len` slots cut to the keys, `-inf` above the diagonal,
  the padded keys filled with the dtype's minimum) where transformers' MPT cannot follow: random biases in every
  Linear and LayerNorm, QK LayerNorm over the whole width, QKV clipping, a logit scale.
Then what a user does with it: cached decoding and transformers' `generate`, save -> Auto load, the hub repository's
layout (config fields, `.bin` weights without the tied head), and the refusals.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MptConfig, MptForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

from flamingo.convert import load_openflamingo_lm
from flamingo.model.mosaic_gpt import MosaicGPTConfig, MosaicGPTForCausalLM, register
from flamingo.runtime.compat import STATIC_CACHE_MASK_HOOK
from flamingo.tiny import random_image, tiny_flamingo

from helpers import write_mosaic_gpt_layout

VOCAB = 97
MPT_KEYS = {".ln_1.": ".norm_1.", ".ln_2.": ".norm_2.", ".mlp.mlp_up.": ".ffn.up_proj.",
            ".mlp.mlp_down.": ".ffn.down_proj.", ".ln_f.": ".norm_f."}  # ours -> transformers' MPT


def _model(seed: int = 0, randomize: bool = True, **config) -> MosaicGPTForCausalLM:
    kw = dict(d_model=32, n_heads=4, n_layers=3, vocab_size=VOCAB, max_seq_len=64)
    kw.update(config)
    torch.manual_seed(seed)
    model = MosaicGPTForCausalLM(MosaicGPTConfig(**kw)).eval()
    if randomize:  # biases start at 0 and LayerNorm weights at 1: make every one of them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") or "ln" in name:
                    p.add_(torch.randn_like(p) * 0.2)
    return model


def _batch(seed: int = 1, rows: int = 3, length: int = 11, pads: tuple[int, ...] = (0, 4, 2)):
    torch.manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0  # left padding
    return ids, mask


@torch.no_grad()
def mosaic_gpt_reference(model: MosaicGPTForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MosaicGPT's forward from its state dict, one head at a time. Returns logits (B, T, V)."""
    c, s = model.config, model.state_dict()
    B, T = ids.shape
    H, D = c.n_heads, c.d_model
    scale = c.softmax_scale or 1 / math.sqrt(D // H)
    m = torch.arange(1, H + 1, dtype=torch.float32) * (c.alibi_bias_max / H)  # MosaicGPT's slopes (H a power of 2)
    alibi = torch.arange(1 - c.max_seq_len, 1, dtype=torch.float32)[None, :] / 2 ** m[:, None]  # (H, max_seq_len)
    alibi = alibi[:, -T:]  # cut to the keys, as `_attn_bias` does with an attention mask

    def ln(x, name):
        return F.layer_norm(x, (D,), s[f"{name}.weight"], s.get(f"{name}.bias"), c.layer_norm_eps)

    def linear(x, name):
        return F.linear(x, s[f"{name}.weight"], s.get(f"{name}.bias"))

    x = s["transformer.wte.weight"][ids]
    for i in range(c.n_layers):
        p = f"transformer.blocks.{i}"
        qkv = linear(ln(x, f"{p}.ln_1"), f"{p}.attn.Wqkv")
        if c.attn_clip_qkv:
            qkv = qkv.clamp(-c.attn_clip_qkv, c.attn_clip_qkv)
        q, k, v = qkv.split(D, dim=-1)
        if c.attn_qk_ln:
            q, k = ln(q, f"{p}.attn.q_ln"), ln(k, f"{p}.attn.k_ln")
        heads = []
        for h in range(H):
            part = slice(h * D // H, (h + 1) * D // H)
            scores = q[..., part] @ k[..., part].transpose(1, 2) * scale + alibi[h]  # (B, T, T)
            scores = scores.masked_fill(~mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -float("inf"))
            heads.append(scores.softmax(-1) @ v[..., part])
        x = x + linear(torch.cat(heads, dim=-1), f"{p}.attn.out_proj")
        x = x + linear(F.gelu(linear(ln(x, f"{p}.ln_2"), f"{p}.mlp.mlp_up")), f"{p}.mlp.mlp_down")
    logits = F.linear(ln(x, "transformer.ln_f"), s["transformer.wte.weight"])
    scale_of_logits = model.config.scale_of_logits()
    return logits if scale_of_logits is None else logits * scale_of_logits


def _close_on_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> None:
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= atol


@pytest.mark.parametrize("options", [
    dict(attn_qk_ln=True), dict(attn_qk_ln=True, attn_clip_qkv=0.3, logit_scale=0.5),
    dict(attn_qk_ln=False, logit_scale="inv_sqrt_d_model", alibi_bias_max=6)])
def test_equals_mosaic_gpt_read_from_its_code(options):
    model = _model(**options)
    ids, mask = _batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, use_cache=False).logits
    reference = mosaic_gpt_reference(model, ids, mask)
    _close_on_real_tokens(ours, reference, mask)
    if options.get("attn_clip_qkv"):  # the clip is reached, so it is tested
        qkv = model.transformer.blocks[0].attn.Wqkv(model.transformer.blocks[0].ln_1(model.transformer.wte(ids)))
        assert (qkv.abs() > options["attn_clip_qkv"]).any()


@pytest.mark.parametrize("n_heads", [4, 6])  # 6: the slopes' rule for head counts that are no power of two
def test_equals_transformers_mpt_where_both_compute_the_same(n_heads):
    model = _model(randomize=False, n_heads=n_heads, d_model=48)  # biases 0, LayerNorms 1, no QK LayerNorm
    config = MptConfig(d_model=48, n_heads=n_heads, n_layers=3, vocab_size=VOCAB, max_seq_len=64)
    config._attn_implementation = "eager"
    mpt = MptForCausalLM(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".bias"):
            assert not value.any()
            continue
        for ours, theirs in MPT_KEYS.items():
            key = key.replace(ours, theirs)
        state[key] = value
    mpt.load_state_dict(state)
    ids, mask = _batch()
    with torch.no_grad():
        _close_on_real_tokens(model(ids, attention_mask=mask).logits, mpt(ids, attention_mask=mask).logits, mask)


def test_cached_decoding_equals_the_uncached_forward():
    model = _model(attn_qk_ln=True, use_cache=False)  # as the hub config says: a cache passed in is still used
    ids, mask = _batch(length=14)
    prompt = 9
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        cache = DynamicCache()
        out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache)
        steps = [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
            steps.append(out.logits[:, -1])
        assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.stack(steps, 1), whole[:, prompt - 1:], atol=1e-5, rtol=1e-5)


def test_transformers_generate_gives_the_uncached_greedy_tokens():
    model = _model(attn_qk_ln=True)
    ids, mask = _batch(rows=2, pads=(0, 3))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected, m = ids, mask
    for _ in range(5):
        with torch.no_grad():
            logits = model(expected, attention_mask=m, use_cache=False).logits[:, -1]
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
        m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert out.tolist() == expected.tolist()


def test_static_cache_decoding_equals_the_dynamic_one():
    """A static cache (compiled decoding's, `generate(compile=True)`): transformers' generate asks the model for the
    bias over all the cache's slots (`create_masks_for_generate`); left-padded rows decode the dynamic cache's
    tokens. Before transformers 5.25 the model does not claim a static cache and both requests are refused."""
    model, processor = tiny_flamingo("mosaic_gpt", gates=0.5, lm_overrides={"initializer_range": 1.0})
    batch = processor(["<image>A photo of<|endofchunk|><image>two", "<image>a cat"],
                      images=[[random_image(0), random_image(1)], [random_image(2)]], padding_side="left")
    if not STATIC_CACHE_MASK_HOOK:
        with pytest.raises(ValueError, match="static"):
            model.generate(**batch, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(ValueError, match="cannot decode with a static cache"):
            model.generate(**batch, max_new_tokens=2, compile=True)
        return
    dynamic = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    static = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()
    with pytest.raises(ValueError, match="static KV cache needs"):  # a static cache without the bias: refused
        model.lm(batch["input_ids"], attention_mask=batch["attention_mask"],
                 past_key_values=StaticCache(config=model.lm.config, max_cache_len=64))


def test_compiled_decoding_is_refused_for_lms_transformers_marks_not_compileable():
    """transformers' MPT would silently decode uncompiled under a compile request: refused with the class's name."""
    model, processor = tiny_flamingo("mpt", gates=0.5)
    with pytest.raises(ValueError, match="MptForCausalLM cannot decode with a static cache"):
        model.generate(**processor("<image>A photo of", images=[random_image(0)]), max_new_tokens=2, compile=True)


def test_save_then_auto_load_gives_the_same_logits(tmp_path):
    model = _model(attn_qk_ln=True, logit_scale=0.7)
    model.save_pretrained(tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["model_type"] == "mosaic_gpt"
    register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert type(loaded) is MosaicGPTForCausalLM
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_the_hub_layout_loads_as_it_is_and_a_mismatch_is_refused(tmp_path):
    model = _model(attn_qk_ln=True)
    write_mosaic_gpt_layout(model, tmp_path / "hub")
    loaded = load_openflamingo_lm(str(tmp_path / "hub"))
    assert type(loaded) is MosaicGPTForCausalLM and loaded.name_or_path == str(tmp_path / "hub")
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)

    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for change, word in ((lambda s: s.pop("transformer.blocks.1.attn.q_ln.weight"), "missing"),
                         (lambda s: s.update({"transformer.blocks.0.attn.rotary.weight": torch.ones(3)}),
                          "unexpected")):
        broken = dict(state)
        change(broken)
        write_mosaic_gpt_layout(model, tmp_path / word, state=broken)
        with pytest.raises(ValueError, match=f"does not match MosaicGPT: .*{word}"):
            load_openflamingo_lm(str(tmp_path / word))


@pytest.mark.parametrize("option,reason", [({"prefix_lm": True}, "prefix_lm"),
                                           ({"alibi": False}, "learned positions")])
def test_options_it_does_not_compute_are_refused(option, reason, tmp_path):
    with pytest.raises(ValueError, match=reason):
        MosaicGPTForCausalLM(MosaicGPTConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=VOCAB, **option))
    write_mosaic_gpt_layout(_model(), tmp_path / "lm", **option)
    with pytest.raises(ValueError, match=reason):
        load_openflamingo_lm(str(tmp_path / "lm"))
