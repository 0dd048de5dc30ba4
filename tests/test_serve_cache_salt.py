"""`cache_salt` (vLLM's request field): the prefix and vision cache entries a request makes under a salt are reused
only by requests with the same salt, so one client cannot learn from `cached_tokens`, the frame counters or timing
whether another sent a prompt or an image; requests without one share the default entries. Answers are the same
whichever entries a prompt reuses."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from flamingo.model.feature_cache import VisionFeatureCache, salt_key
from flamingo.model.prefix_cache import PrefixCache
from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Job
from flamingo.serve.sampling import SamplingParams
from flamingo.tiny import random_image

from serve_helpers import SHOT, data_url, engine_for, openai_client, running_server, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = SHOT * 2 + "<image>Question: what is in the image? Short answer:"  # 100+ tokens: several whole blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("salt") / "model")


def test_a_salted_view_shares_the_store_and_finds_only_its_own_entries():
    cache = VisionFeatureCache(2**20)
    assert cache.salted(None) is cache and cache.salted("") is cache
    a, b = cache.salted("A"), cache.salted("B")
    frame = torch.rand(1, 3, 8, 8)
    tower = lambda pixels: pixels.flatten(1)[:, None]  # noqa: E731  (K, 1, 192)
    for view in (a, a, b, cache, cache):
        view.encode(frame, tower)
    assert (cache.frames, cache.computed, len(cache.store)) == (5, 3, 3)  # A, B and none each computed it once
    prefix = PrefixCache(2**20, block=4)
    ids = torch.arange(12)
    assert prefix.salted(None).keys(ids, -1) == prefix.keys(ids, -1)  # no salt: the shared default's keys
    assert not set(prefix.salted("A").keys(ids, -1)) & set(prefix.keys(ids, -1) + prefix.salted("B").keys(ids, -1))
    assert prefix.salted("A").store is prefix.store


def _chat(client, salt, image):
    extra = {} if salt is None else {"cache_salt": salt}
    reply = client.chat.completions.create(
        model="tiny", max_tokens=4, temperature=0, extra_body=extra,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": "Question: what is in the image? " * 4}]}])
    return reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens


def _completion(client, salt, image):
    extra = {"media": [data_url(image)] * 3, **({} if salt is None else {"cache_salt": salt})}
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=extra)
    return reply.choices[0].text, reply.usage.prompt_tokens_details.cached_tokens


def _response(client, salt, image):
    extra = {} if salt is None else {"cache_salt": salt}
    reply = client.responses.create(
        model="tiny", max_output_tokens=4, temperature=0, extra_body=extra,
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": data_url(image)},
                                            {"type": "input_text", "text": "Question: what is in it? " * 4}]}])
    return reply.output_text, reply.usage.input_tokens_details.cached_tokens


@pytest.mark.parametrize("ask", [_chat, _completion, _response], ids=["chat", "completions", "responses"])
def test_a_prompt_is_reused_only_under_its_own_salt(model_dir, ask):
    engine = engine_for(model_dir)
    image = random_image(7)
    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        client = openai_client(url)
        first = ask(client, "tenant-A", image)
        other, again, unsalted, shared = (ask(client, salt, image) for salt in ("tenant-B", "tenant-A", None, None))
    assert first[1] == other[1] == unsalted[1] == 0
    assert again[1] > 0 and shared[1] == again[1]
    assert first[0] == other[0] == again[0] == unsalted[0] == shared[0]


def test_an_image_is_reused_only_under_its_own_salt(model_dir):
    """The vision cache alone (no prefix cache): the tower runs again for an image sent under another salt."""
    engine = engine_for(model_dir, prefix_cache_mib=0)
    image = random_image(8)

    def computed() -> int:
        text = httpx.get(url + "/metrics").text
        return int(next(line.split()[-1] for line in text.splitlines()
                        if line.startswith("flamingo_vision_frames_computed_total")))

    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        client = openai_client(url)
        seen = []
        for salt in ("tenant-A", "tenant-B", "tenant-A", None):
            before = computed()
            seen.append((_chat(client, salt, image)[0], computed() - before))
        empty = httpx.post(url + "/v1/completions", json={"prompt": "a", "cache_salt": ""})
    assert [ran for _, ran in seen] == [1, 1, 0, 1]
    assert len({text for text, _ in seen}) == 1
    assert empty.status_code == 400 and "cache_salt" in empty.json()["error"]["message"]  # vLLM's: not empty


def test_prompts_with_media_prefilled_together_share_one_salt(model_dir):
    """One shared prefill call runs the tower once, through one cache view: a prompt with media under another salt
    waits for a call of its own, so each image is stored under its own request's salt."""
    engine = engine_for(model_dir, prefix_cache_mib=0, max_batch=4)
    images = {"tenant-A": random_image(1), "tenant-B": random_image(2)}
    done = threading.Semaphore(0)
    for salt, image in images.items():
        ids, media = engine.processor.encode_prompt("<image>Output:", [image])
        engine.submit(Job(torch.tensor(ids), engine.processor.batch_media([media]), SamplingParams(max_tokens=1),
                          lambda e: done.release() if e.kind in ("done", "error") else None, cache_salt=salt))
    engine.start()  # both wait: the first turn may prefill them together
    try:
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.stop(0.0)
    for salt, image in images.items():
        frame = engine.processor.preprocess_media([image])[0].to(next(engine.model.vision.parameters()).dtype)
        assert VisionFeatureCache.key(frame, salt_key(salt)) in engine.vision_cache.store, salt
