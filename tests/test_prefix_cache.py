"""The prefix cache: prompts that begin alike (same tokens, same images) reuse each other's prefill and decode exactly
what they decode alone; keys change with any earlier token or pixel; the byte budget evicts chains from their ends;
over HTTP the second of two requests sharing few-shot demonstrations reports its cached tokens."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from flamingo.model.batching import DecodeBatch
from flamingo.model.prefill import Prefill
from flamingo.model.prefix_cache import PrefixCache
from flamingo.serve.app import ServeSettings
from flamingo.tiny import random_image

from serve_helpers import SHARP, SHOT, data_url, engine_for, greedy_alone, running_server, save_tiny_model

QUERY = "<image>Question: what is this one? Short answer:"
DEMOS = [random_image(i) for i in range(3)]


def _prefill(model, processor, prompt, media, cache, *, chunk=5, media_per_step=1):
    b = processor(prompt, images=media)
    prefill = Prefill(model, b["input_ids"][0], b["images"], b["num_media"], b["num_frames"], chunk=chunk,
                      prefix_cache=cache)
    for _ in range(10_000):
        row = prefill.step(media_per_step=media_per_step)
        if row is not None:
            return row, b
    raise AssertionError("the prefill did not end")


def _decode_alone(model, row, steps):
    """Greedy tokens of a prefilled row decoded alone in a `DecodeBatch` (the engine's decode path)."""
    suppress = model.config.media_token_id
    batch = DecodeBatch(model, 1)
    batch.add(row)
    logits = row.logits.clone()
    logits[suppress] = -float("inf")
    tokens = [int(logits.argmax())]
    while len(tokens) < steps:
        logits = batch.step(torch.tensor(tokens[-1:]))
        logits[:, suppress] = -float("inf")
        tokens.append(int(logits[0].argmax()))
    return tokens


def _generate(model, batch, steps):
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("lm_kind,overrides", [("llama", {}), ("gpt2", {}), ("opt", {}), ("mosaic_gpt", {}),
                                               ("llama", dict(num_image_references=4)),
                                               ("llama", dict(only_attend_last_image=False))])
def test_prompts_sharing_demos_reuse_the_prefill_and_decode_as_alone(make_model, lm_kind, overrides, one_thread):
    model, processor = make_model(lm_kind, lm_overrides=SHARP[lm_kind], **overrides)
    cache = PrefixCache(2**26, block=8)
    for q in range(3):
        prompt, media = SHOT * 3 + QUERY, DEMOS + [random_image(100 + q)]
        row, b = _prefill(model, processor, prompt, media, cache)
        query_at = int((b["input_ids"][0] == model.config.media_token_id).nonzero()[-1])  # the query's <image>
        assert row.cached_tokens == (0 if q == 0 else query_at // 8 * 8), q
        alone, _ = _prefill(model, processor, prompt, media, None, chunk=1000, media_per_step=None)
        torch.testing.assert_close(row.logits, alone.logits, atol=5e-3, rtol=1e-4)
        assert _decode_alone(model, row, 8) == _generate(model, b, 8), q


def test_a_video_and_a_reference_in_the_shared_prefix(make_model, one_thread):
    model, processor = make_model("llama", lm_overrides=SHARP["llama"], num_image_references=4)
    video = [random_image(50 + k) for k in range(3)]
    prefix = "<image>A clip of a moving shape.<|endofchunk|>" + SHOT + "Compare <image0> and <image1>."
    cache = PrefixCache(2**26, block=4)
    for q in range(2):
        row, b = _prefill(model, processor, prefix + QUERY, [video, DEMOS[0], random_image(200 + q)], cache)
        assert (row.cached_tokens > 0) == (q == 1)
        assert _decode_alone(model, row, 8) == _generate(model, b, 8)


def test_keys_change_with_any_earlier_token_or_pixel(make_model):
    model, processor = make_model("llama")
    cache, media_token = PrefixCache(2**20, block=4), model.config.media_token_id

    def keys(prompt, media):
        b = processor(prompt, images=media)
        return cache.keys(b["input_ids"][0], media_token, b["images"], b["num_frames"]), b["input_ids"][0]

    base, ids = keys(SHOT * 2, DEMOS[:2])
    assert base == keys(SHOT * 2, DEMOS[:2])[0] and len(base) == ids.numel() // 4
    second = int((ids == media_token).nonzero()[1])  # the second image's token
    other_image, _ = keys(SHOT * 2, [DEMOS[0], DEMOS[2]])
    assert other_image[:second // 4] == base[:second // 4]
    assert all(a != b for a, b in zip(other_image[second // 4:], base[second // 4:]))
    changed = ids.clone()
    changed[5] += 1  # one token of block 1
    other_token = cache.keys(changed, media_token, processor(SHOT * 2, images=DEMOS[:2])["images"])
    assert other_token[:1] == base[:1] and all(a != b for a, b in zip(other_token[1:], base[1:]))
    two_frames, _ = keys(SHOT * 2, [[DEMOS[0], DEMOS[1]], DEMOS[1]])
    one_frame, _ = keys(SHOT * 2, [[DEMOS[0]], DEMOS[1]])
    assert two_frames[0] != one_frame[0]  # a video's frames are part of its digest


def test_an_identical_prompt_still_computes_its_last_token(make_model, one_thread):
    model, processor = make_model("llama", lm_overrides=SHARP["llama"])
    cache = PrefixCache(2**26, block=8)
    prompt, media = SHOT * 2 + QUERY, DEMOS
    first, b = _prefill(model, processor, prompt, media, cache)
    again, _ = _prefill(model, processor, prompt, media, cache)
    length = b["input_ids"].shape[1]
    assert first.cached_tokens == 0 and again.cached_tokens == (length - 1) // 8 * 8
    torch.testing.assert_close(again.logits, first.logits, atol=5e-3, rtol=1e-4)
    assert again.cache.layers[0].keys.shape == first.cache.layers[0].keys.shape


def test_the_budget_evicts_chains_from_their_ends(make_model, one_thread):
    model, processor = make_model("llama")
    block = 8
    probe = PrefixCache(2**30, block=block)
    row, b = _prefill(model, processor, SHOT * 2, DEMOS[:2], probe)
    per_prompt = probe.bytes
    cache = PrefixCache(int(per_prompt * 1.5), block=block)
    prompts = [("Some text first. " + SHOT * 2, DEMOS[:2]), ("Other words here. " + SHOT * 2, DEMOS[1:3])]
    for prompt, media in prompts:
        _prefill(model, processor, prompt, media, cache)
        assert cache.bytes <= cache.store.max_size
    token = model.config.media_token_id
    for prompt, media in prompts:
        bb = processor(prompt, images=media)
        keys = cache.keys(bb["input_ids"][0], token, bb["images"], bb["num_frames"])
        present = [k in cache.store for k in keys]
        assert present == sorted(present, reverse=True), present  # what is left of a chain is its beginning
    first = processor(*prompts[0])
    assert not all(k in cache.store for k in cache.keys(first["input_ids"][0], token, first["images"]))
    with pytest.raises(ValueError, match=">= 0 MiB"):
        PrefixCache.of_mib(-1)
    assert PrefixCache.of_mib(0) is None


def test_a_prompt_longer_than_the_cache_keeps_hitting_its_beginning(make_model, one_thread):
    """A prompt of more blocks than the budget holds: each prefill stores its blocks last to first, so the chain's
    beginning stays. A reused block that was evicted meanwhile was skipped, not stored again: the blocks after it
    could not be found, and the prompt hit its cache every other time only."""
    model, processor = make_model("llama")
    block = 8
    probe = PrefixCache(2**30, block=block)
    prompt = SHOT * 6
    _prefill(model, processor, prompt, DEMOS[:1] * 6, probe)
    cache = PrefixCache(probe.bytes // 3, block=block)  # a third of the prompt's blocks
    cached = [_prefill(model, processor, prompt, DEMOS[:1] * 6, cache)[0].cached_tokens for _ in range(4)]
    assert cached[0] == 0 and cached[1] > 0 and cached[1:] == [cached[1]] * 3, cached


def test_blocks_keep_log_probabilities_when_a_prefill_computed_them(make_model, one_thread):
    """A prompt-logprobs prefill reuses only blocks that keep their tokens' log-probabilities, recomputes from the
    last reused token, and gives the values of a prefill without the cache; a block stored without them gains them
    when such a prefill passes; more alternatives than blocks keep are computed, not reused."""
    model, processor = make_model("llama")
    prompt, media = SHOT * 2 + QUERY, DEMOS[:3]
    b = processor(prompt, images=media)
    args = (model, b["input_ids"][0], b["images"], b["num_media"], b["num_frames"])

    def run(cache, top=2):
        return Prefill(*args, chunk=7, prefix_cache=cache, prompt_logprobs=top).step(2**62)

    alone = run(None)
    assert len(alone.prompt_logprobs) == b["input_ids"].shape[1] - 1 and alone.prompt_logprobs.top_ids.shape[1] == 2
    cache = PrefixCache(2**30, block=8)
    Prefill(*args, chunk=7, prefix_cache=cache).step(2**62)  # a plain prefill: blocks without log-probabilities
    keys = cache.keys(b["input_ids"][0], model.config.media_token_id, b["images"], b["num_frames"])
    assert cache.lookup(keys, len(keys), logprobs=True) is None and cache.lookup(keys, len(keys)) is not None
    first = run(cache)
    assert first.cached_tokens == 0  # nothing with log-probabilities yet; this prefill adds them to the blocks
    assert cache.lookup(keys, len(keys), logprobs=True).tokens == len(keys) * 8
    again = run(cache)
    assert again.cached_tokens == ((b["input_ids"].shape[1] - 1) // 8) * 8 - 1  # the last reused token runs again
    for row in (first, again):
        torch.testing.assert_close(row.prompt_logprobs.logprobs, alone.prompt_logprobs.logprobs, atol=5e-3, rtol=0)
        torch.testing.assert_close(row.prompt_logprobs.top_logprobs, alone.prompt_logprobs.top_logprobs, atol=5e-3,
                                   rtol=0)
    assert run(cache, top=6).cached_tokens == 0  # blocks keep 5 alternatives


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("prefix_model"))


def test_requests_sharing_demos_report_cached_tokens_over_http(model_dir, one_thread):
    """Two chat requests with the same two demonstrations (images included) and different queries: the second
    reports its reused tokens in `usage.prompt_tokens_details.cached_tokens`, answers as it does alone, and the
    metrics count the cached tokens. With the cache off, nothing is cached."""
    question = "Question: what is in the image? Short answer:"
    demos = [random_image(1), random_image(2)]

    def messages(query_image):
        out = []
        for image in demos:
            out += [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                 {"type": "text", "text": question}]},
                    {"role": "assistant", "content": "a red circle."}]
        return out + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(query_image)}},
                                                   {"type": "text", "text": question}]}]

    prompt = f"<image>{question} a red circle.<|endofchunk|>" * 2 + f"<image>{question}"
    for mib in (64, 0):
        engine = engine_for(model_dir, max_batch=4, prefill_chunk=16, prefix_cache_mib=mib)
        with running_server(engine, ServeSettings(model_name="tiny")) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none")
            cached = []
            for q in range(2):
                query = random_image(30 + q)
                reply = client.chat.completions.create(model="tiny", messages=messages(query), max_tokens=6,
                                                       temperature=0)
                cached.append(reply.usage.prompt_tokens_details.cached_tokens)
                tokens = greedy_alone(engine, prompt, demos + [query], 6)
                stopped = bool(tokens) and tokens[-1] in engine.eos
                assert (q, reply.choices[0].message.content) == (q, engine.processor.decode(
                    tokens[:-1] if stopped else tokens).lstrip())
            metrics = httpx.get(url + "/metrics").text
        if mib:
            assert cached[0] == 0 and cached[1] >= 32, cached
            assert f"flamingo_prompt_tokens_cached_total {cached[1]}" in metrics
        else:
            assert cached == [0, 0]
