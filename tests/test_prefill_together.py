"""Prompts prefilled together (`prefill_together`: one left-padded LM call) hand each its own row equal to the prompt
prefilled alone: its cache without padding, its images' K/V, its media state, its last logits, its prefix-cache
blocks; rows decode the same greedy tokens. LMs that cannot (no position ids, a short sliding window) are refused."""

from __future__ import annotations

import pytest
import torch

from flamingo.model.batching import DecodeBatch
from flamingo.model.prefill import Prefill, can_prefill_together, prefill_together
from flamingo.model.prefix_cache import PrefixCache
from flamingo.tiny import random_image

from serve_helpers import SHARP, SHOT

PROMPTS = [
    ("Question: what is this? Short answer:", []),
    ("<image>Question: what is this? Short answer:", [random_image(1)]),
    (SHOT * 2 + "<image>Question: and this? Short answer:", [random_image(i) for i in range(3)]),
    ("<image>What moves?", [[random_image(i) for i in range(3)]]),  # a 3-frame video
]


def _prefill(model, processor, prompt, media, **kwargs) -> Prefill:
    b = processor(prompt, images=media, image_references=True if "<image0>" in prompt else None)
    p = Prefill(model, b["input_ids"][0], b["images"], b.get("num_media"), b.get("num_frames"), **kwargs)
    p.prepare()
    return p


def _alone(model, processor, prompt, media, **kwargs):
    p = _prefill(model, processor, prompt, media, **kwargs)
    row = None
    while row is None:
        row = p.step()
    return row


def _greedy(model, rows, steps: int) -> list[list[int]]:
    batch = DecodeBatch(model, len(rows))
    tokens = []
    for row in rows:
        batch.add(row)
        tokens.append([int(row.logits.argmax())])
    for _ in range(steps):
        logits = batch.step(torch.tensor([t[-1] for t in tokens]))
        for t, nxt in zip(tokens, logits.argmax(-1).tolist()):
            t.append(nxt)
    return tokens


def _assert_rows_equal(together, alone):
    assert together.length == alone.length and together.cached_tokens == alone.cached_tokens
    assert torch.allclose(together.logits, alone.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(together.decode_index, alone.decode_index)
    assert (together.decode_count is None) == (alone.decode_count is None)
    if alone.decode_count is not None:
        assert torch.equal(together.decode_count, alone.decode_count)
    for a, b in zip(together.cache.layers, alone.cache.layers, strict=True):
        assert a.keys.shape == b.keys.shape and torch.allclose(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        assert torch.allclose(a.values, b.values, atol=1e-4, rtol=1e-4)
    assert (together.media_kv is None) == (alone.media_kv is None)
    for a, b in zip(together.media_kv or [], alone.media_kv or [], strict=True):
        assert a.k.shape == b.k.shape and torch.allclose(a.k, b.k, atol=1e-4, rtol=1e-4)
        assert torch.allclose(a.v, b.v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lm_kind, config", [("llama", {}), ("gpt2", {}), ("llama", {"only_attend_last_image": False}),
                                             ("llama", {"num_image_references": 3})],
                         ids=["llama", "gpt2", "all-images", "references"])
def test_prompts_prefilled_together_equal_each_alone_and_decode_alike(make_model, lm_kind, config, one_thread):
    model, processor = make_model(lm_kind, lm_overrides=SHARP[lm_kind], **config)
    prompts = PROMPTS
    if config.get("num_image_references"):
        prompts = PROMPTS[:2] + [("Image 0 is <image0>. Image 1 is <image1>. What is in <image0>?",
                                  [random_image(7), random_image(8)])]
    alone = [_alone(model, processor, text, media) for text, media in prompts]
    together = prefill_together(model, [_prefill(model, processor, text, media) for text, media in prompts])
    for t, a in zip(together, alone, strict=True):
        _assert_rows_equal(t, a)
    assert _greedy(model, together, 8) == _greedy(model, alone, 8)


def test_prompts_prefilled_together_fill_and_use_the_prefix_cache(make_model, one_thread):
    model, processor = make_model("llama", lm_overrides=SHARP["llama"])
    cache = PrefixCache.of_mib(64)
    long = (SHOT * 3 + "<image>Question: what is it? Short answer:", [random_image(i) for i in range(4)])
    together = prefill_together(model, [_prefill(model, processor, *long, prefix_cache=cache),
                                        _prefill(model, processor, *PROMPTS[0], prefix_cache=cache)])
    assert cache.bytes > 0
    again = _alone(model, processor, *long, prefix_cache=cache)  # its blocks were stored by the shared call
    assert again.cached_tokens > 0
    _assert_rows_equal(together[0], _alone(model, processor, *long))
    assert torch.allclose(again.logits, together[0].logits, atol=1e-4, rtol=1e-4)


def test_lms_that_cannot_share_a_prefill_and_prompts_that_are_not_fresh_are_refused(make_model):
    mpt, processor = make_model("mosaic_gpt")  # ALiBi, no position ids: padding would move the biases
    assert not can_prefill_together(mpt, 10)
    with pytest.raises(ValueError, match="cannot prefill prompts together"):
        prefill_together(mpt, [_prefill(mpt, processor, *PROMPTS[0]), _prefill(mpt, processor, *PROMPTS[1])])
    mistral, _ = make_model("mistral", lm_overrides={"sliding_window": 16})
    assert can_prefill_together(mistral, 14) and not can_prefill_together(mistral, 15)
    model, processor = make_model("llama")
    started = _prefill(model, processor, *PROMPTS[2], chunk=4)
    started.step()
    assert not started.fresh
    with pytest.raises(ValueError, match="fresh prompts"):
        prefill_together(model, [started, _prefill(model, processor, *PROMPTS[0])])
    logprobs = _prefill(model, processor, *PROMPTS[0], prompt_logprobs=2)
    assert not logprobs.fresh
