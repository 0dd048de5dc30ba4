"""flamingo.runtime.compat: each version branch, on the transformers that takes it (CI runs this file on both ends
of the supported range; a branch the installed version does not take is skipped with the version that takes it)."""

import pytest
import torch
import transformers
from transformers import IdeficsConfig

from flamingo.model.batching import DecodeBatch
from flamingo.runtime import compat
from flamingo.runtime.compat import TRANSFORMERS
from flamingo.tiny import tiny_flamingo, tiny_lm, tiny_tokenizer

before_5_24 = pytest.mark.skipif(TRANSFORMERS >= (5, 24), reason="transformers >= 5.24 names the KV cache `cache`")
from_5_24 = pytest.mark.skipif(TRANSFORMERS < (5, 24), reason="transformers < 5.24 names it `past_key_values`")
before_5 = pytest.mark.skipif(TRANSFORMERS >= (5, 0), reason="a transformers 4 branch")
from_5 = pytest.mark.skipif(TRANSFORMERS < (5, 0), reason="a transformers 5 branch")


def test_version_tuple_reads_local_and_dev_versions():
    assert compat.version_tuple("2.6.0+cu124") == (2, 6)
    assert compat.version_tuple("5.0.0.dev0") == (5, 0)
    assert compat.TORCH == compat.version_tuple(torch.__version__)


def test_versions_below_the_floors_are_refused_by_name():
    """Installed around pip's ranges, transformers 4.53 failed at import on a missing cache class; now it is named."""
    compat.check_supported(transformers.__version__, torch.__version__)  # the installed pair is supported
    compat.check_supported("4.54.1", "2.6.0+cu124")
    with pytest.raises(ImportError, match=r"transformers 4\.53\.3 \(needs >= 4\.54\)"):
        compat.check_supported("4.53.3", "2.13.0")
    with pytest.raises(ImportError, match=r"transformers 4\.40\.0 .* and torch 2\.5\.1 \(needs >= 2\.6\)"):
        compat.check_supported("4.40.0", "2.5.1")
    text = open("pyproject.toml").read()  # the floors are pyproject's
    assert '"transformers>=4.54.1,<6"' in text and '"torch>=2.6"' in text  # 4.54.1: its patch (docs/compat.md)
    assert compat.TRANSFORMERS_FLOOR == (4, 54) and compat.TORCH_FLOOR == (2, 6)
    # CI's oldest pair is the declared floor
    assert "OLD_PAIR='torch==2.6.0 transformers==4.54.1'" in open(".ci/run").read()


def test_dtype_keyword_is_the_one_from_pretrained_takes(tmp_path):
    expected = "dtype" if TRANSFORMERS >= (4, 56) else "torch_dtype"
    assert compat.dtype_kwargs(torch.float16) == {expected: torch.float16} and compat.dtype_kwargs(None) == {}
    tiny_lm("llama").save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **compat.dtype_kwargs(torch.float16))
    assert next(loaded.parameters()).dtype == torch.float16


def _cache_round_trip(lm) -> None:
    """The cache read off an output (under the name this version uses) feeds the next call (under the argument
    name it takes) and gives the uncached logits."""
    ids = torch.arange(1, 9)[None]  # (1, 8)
    with torch.no_grad():
        first = lm(input_ids=ids[:, :6], use_cache=True)
        cache = compat.lm_output_cache(first)
        assert cache is not None
        step = lm(input_ids=ids[:, 6:], use_cache=True, **{compat.lm_cache_argument(lm): cache}).logits
        whole = lm(input_ids=ids).logits[:, 6:]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)


@from_5_24
def test_cache_is_named_cache():
    lm = tiny_lm("llama")
    assert compat.lm_cache_argument(lm) == "cache"
    _cache_round_trip(lm)


@before_5_24
def test_cache_is_named_past_key_values():
    lm = tiny_lm("llama")
    assert compat.lm_cache_argument(lm) == "past_key_values"
    _cache_round_trip(lm)


@pytest.mark.parametrize("kind", ["llama", "opt", "mpt"])
def test_last_logits_only_where_the_forward_takes_it(kind):
    lm = tiny_lm(kind)
    kwargs = compat.lm_last_logits_only(lm)
    # OPT takes logits_to_keep from transformers 5, MPT from 5.x too; Llama across the range
    assert (kwargs == {"logits_to_keep": 1}) == (kind == "llama" or TRANSFORMERS >= (5, 0))
    ids = torch.arange(1, 7)[None]
    with torch.no_grad():
        logits = lm(input_ids=ids, **kwargs).logits
        full = lm(input_ids=ids).logits
    assert logits.shape[1] == (1 if kwargs else 6)
    torch.testing.assert_close(logits[:, -1], full[:, -1])


def test_position_ids_probe():
    assert compat.lm_takes_position_ids(tiny_lm("llama")) and not compat.lm_takes_position_ids(tiny_lm("mpt"))


def _added_tokens_keep_earlier_ones(flag: str) -> None:
    tok = tiny_tokenizer()
    assert list(compat.keep_special_tokens_kwargs(tok)) == [flag]
    tok.add_special_tokens({"additional_special_tokens": ["<a>"]})
    tok.add_special_tokens({"additional_special_tokens": ["<b>"]}, **compat.keep_special_tokens_kwargs(tok))
    assert {"<a>", "<b>"} <= set(tok.all_special_tokens)


@from_5
def test_special_tokens_flag_transformers_5():
    _added_tokens_keep_earlier_ones("replace_extra_special_tokens")


@before_5
def test_special_tokens_flag_transformers_4():
    _added_tokens_keep_earlier_ones("replace_additional_special_tokens")


@from_5
def test_pil_image_processor_is_the_pil_twin():
    assert compat.pil_image_processor("CLIPImageProcessor") is transformers.CLIPImageProcessorPil


@before_5
def test_pil_image_processor_is_the_class_itself():
    assert compat.pil_image_processor("CLIPImageProcessor") is transformers.CLIPImageProcessor


@from_5
def test_idefics_rope_parameters_are_copied():
    config = IdeficsConfig()
    assert compat.idefics_rope_kwargs(config) == {"rope_parameters": dict(config.rope_parameters)}


@before_5
def test_idefics_rope_is_llamas_default():
    assert compat.idefics_rope_kwargs(IdeficsConfig()) == {}
    assert transformers.LlamaConfig().rope_theta == 10000.0  # IDEFICS 4.x's fixed rotary base


@pytest.mark.parametrize("kind", ["llama", "legacy_tuples"])
def test_select_cache_rows_leaves_the_source_untouched(kind):
    lm = tiny_lm("llama")
    with torch.no_grad():
        cache = compat.lm_output_cache(lm(input_ids=torch.arange(1, 13).view(3, 4), use_cache=True))
    if kind == "legacy_tuples":  # families that return (key, value) per layer
        cache = tuple((layer.keys, layer.values) for layer in cache.layers)
    keys = (lambda c: c[0][0]) if kind == "legacy_tuples" else (lambda c: c.layers[0].keys)
    before = keys(cache).clone()
    rows = torch.tensor([2, 0, 2])
    picked = compat.select_cache_rows(cache, rows)
    assert torch.equal(keys(picked), before[rows]) and torch.equal(keys(cache), before)


@pytest.mark.skipif(compat.CONTINUOUS_BATCHING, reason="transformers >= 5.4 batches (tests/test_serve_batching.py)")
def test_continuous_batching_refused_before_5_4():
    with pytest.raises(RuntimeError, match="continuous batching .* needs transformers >= 5.4"):
        DecodeBatch(tiny_flamingo("llama")[0], max_rows=2)
