"""OpenAI's newer request fields (serve/protocol.py) and the edges of its ranges: prompt-caching hints
(`prompt_cache_retention`, `prompt_cache_options`, a content part's `prompt_cache_breakpoint`) and the Responses API's
`background_options` and `access_programs` are taken and change nothing; `moderation`, `context_management`,
`image.context_compression: "enabled"` and `prompt_cache_options.prewarm` ask for what this server does not do and are
refused by name; every one of them is taken null. `top_p: 0` is the likeliest token alone, the greedy answer. Media
sent as bare base64 (no `data:` head) is told how a data URL starts (serve/media.py)."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch

from flamingo.serve.media import MediaPolicy, load_medium
from flamingo.serve.protocol import APIError, ChatCompletionRequest, ResponsesRequest, parse
from flamingo.serve.sampling import SamplingParams, _draw_sorted, pick_tokens
from flamingo.tiny import random_image

from serve_helpers import data_url, openai_client, serving_tiny

QUESTION = "Question: what is in the image? Short answer:"
BREAK = {"mode": "explicit", "ttl": "30m"}
CACHE = {"prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit", "ttl": "30m",
                                                                   "prewarm": False}}


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving_tiny(tmp_path_factory.mktemp("serve_protocol_fields"), max_batch=8, prefill_chunk=16) as served:
        yield served


def _chat(url: str, **fields) -> str:
    image = data_url(random_image(1))
    text = {"type": "text", "text": QUESTION}
    parts = [{"type": "image_url", "image_url": {"url": image}}, text]
    if fields.pop("breakpoints", False):
        parts = [{**parts[0], "prompt_cache_breakpoint": BREAK},
                 {**text, "prompt_cache_breakpoint": {"mode": "explicit"}}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                       "max_tokens": 6, "temperature": 0, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_prompt_cache_hints_are_taken_and_change_nothing(served):
    _, url = served
    plain = _chat(url)
    assert _chat(url, breakpoints=True, **CACHE) == plain
    assert _chat(url, prompt_cache_retention="in_memory", prompt_cache_options={"mode": "explicit"}) == plain
    client = openai_client(url)
    image = data_url(random_image(1))
    parts = [{"type": "input_image", "image_url": image}, {"type": "input_text", "text": QUESTION}]
    items = [{"role": "user", "content": parts}]
    marked = [{"role": "user", "content": [{**part, "prompt_cache_breakpoint": BREAK} for part in parts]}]
    kwargs = dict(model="tiny", max_output_tokens=6, temperature=0)
    first = client.responses.create(input=items, **kwargs).output_text
    extra = {**CACHE, "prompt_cache_options": {"mode": "explicit", "ttl": "12h", "comparison_response_id": "resp_1"},
             "background_options": {"completion_window": "soonest", "continuation_id": "c"},
             "access_programs": {"cyber": "standard"}, "image": {"context_compression": "disabled"}}
    assert client.responses.create(input=marked, extra_body=extra, **kwargs).output_text == first


NULL_CHAT = ("prompt_cache_retention", "prompt_cache_options", "moderation")
NULL_RESPONSES = NULL_CHAT + ("context_management", "background_options", "access_programs", "image")


def test_every_newer_field_is_taken_null():
    """A client that sends every field, null when unset (OpenAI's SDK types list these)."""
    chat = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "prompt_cache_breakpoint": None}]}], **dict.fromkeys(NULL_CHAT)})
    assert chat.moderation is None
    parse(ResponsesRequest, {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi", "prompt_cache_breakpoint": None}]}], **dict.fromkeys(NULL_RESPONSES)})
    parse(ResponsesRequest, {"input": "hi", "context_management": [], "image": {"context_compression": "auto"}})


MODERATION = {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}}}


@pytest.mark.parametrize("model, body, param, says", [
    (ChatCompletionRequest, {"moderation": MODERATION}, "moderation", "moderation is not supported"),
    (ResponsesRequest, {"moderation": MODERATION}, "moderation", "moderation is not supported"),
    (ChatCompletionRequest, {"prompt_cache_options": {"prewarm": True}}, "prompt_cache_options.prewarm",
     "not supported"),
    (ResponsesRequest, {"context_management": [{"type": "compaction", "compact_threshold": 1000}]},
     "context_management", "compacts no context"),
    (ResponsesRequest, {"image": {"context_compression": "enabled"}}, "image.context_compression",
     "compresses no image context"),
    (ChatCompletionRequest, {"prompt_cache_retention": "1h"}, "prompt_cache_retention", "'in_memory' or '24h'"),
    (ChatCompletionRequest, {"prompt_cache_options": {"ttl": "5m"}}, "prompt_cache_options.ttl", "'30m'"),
    (ChatCompletionRequest, {"prompt_cache_options": {"size": 1}}, "prompt_cache_options.size", "Unrecognized"),
    (ResponsesRequest, {"access_programs": {"cyber": "red"}}, "access_programs.cyber", "'standard'"),
    (ResponsesRequest, {"background_options": {"completion_window": "1d"}}, "background_options.completion_window",
     "'soonest'"),
])
def test_asking_for_what_is_not_done_is_refused_by_name(model, body, param, says):
    base = {"messages": [{"role": "user", "content": "hi"}]} if model is ChatCompletionRequest else {"input": "hi"}
    with pytest.raises(APIError) as refused:
        parse(model, {**base, **body})
    assert refused.value.status == 400 and refused.value.param == param, refused.value.message
    assert says in refused.value.message, refused.value.message


def test_a_breakpoint_is_typed_where_it_stands():
    with pytest.raises(APIError) as refused:
        parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "prompt_cache_breakpoint": {"mode": "implicit"}}]}]})
    assert refused.value.param == "messages.0.content.0.prompt_cache_breakpoint.mode", refused.value.message


def test_top_p_0_is_the_greedy_answer(served):
    """OpenAI's range is [0, 1]: 0 keeps the likeliest token alone (the nucleus always keeps one), so a sampled
    request (temperature 1, any seed) answers as temperature 0 does, on every endpoint."""
    _, url = served
    client = openai_client(url)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(random_image(2))}},
                                             {"type": "text", "text": QUESTION}]}]
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    sampled = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1, top_p=0,
                                             n=3, seed=5)
    assert {c.message.content for c in sampled.choices} == {greedy.choices[0].message.content}
    free = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1, n=3, seed=5)
    assert {c.message.content for c in free.choices} != {greedy.choices[0].message.content}  # top_p 1 samples
    text = client.completions.create(model="tiny", prompt="Output:", max_tokens=8, temperature=0).choices[0].text
    again = client.completions.create(model="tiny", prompt="Output:", max_tokens=8, temperature=2, top_p=0, seed=1)
    assert again.choices[0].text == text
    out = [client.responses.create(model="tiny", input="Output:", max_output_tokens=8, **kw)
           for kw in ({"temperature": 0}, {"temperature": 1, "top_p": 0})]
    assert out[0].output_text == out[1].output_text and out[1].top_p == 0


def test_the_samplers_top_p_0_is_the_argmax():
    """Both nucleus draws (a CPU row's top-k search, a device's sort of all rows) keep the likeliest token alone."""
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 3
    params = [SamplingParams(max_tokens=1, temperature=t, top_p=0.0) for t in (0.3, 1.0, 2.0, 1.0, 1.0, 0.7)]
    generators = [torch.Generator().manual_seed(i) for i in range(6)]
    assert torch.equal(pick_tokens(logits, params, generators, suppress=()), logits.argmax(-1))
    probs = logits.softmax(-1)
    assert torch.equal(_draw_sorted(probs, [0.0] * 6, torch.rand(6, 1)), probs.argmax(-1))


def _b64_png() -> str:
    buffer = io.BytesIO()
    random_image(3).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("wrap", [lambda b: b, lambda b: "\n".join(b[i:i + 76] for i in range(0, len(b), 76))])
def test_bare_base64_is_told_how_a_data_url_starts(tmp_path, wrap):
    """Media data without its `data:<type>;base64,` head is refused with the head to add, with or without a media
    root; a JPEG's base64 (`/9j/...`) reads as an absolute path, and is told the same."""
    bare = wrap(_b64_png())
    jpeg = "/9j/" + bare[4:]
    for policy in (MediaPolicy(), MediaPolicy(root=tmp_path)):
        for sent in (bare, jpeg):
            with pytest.raises(APIError) as refused:
                load_medium(sent, policy, where="medium 0")
            assert "a data URL needs `data:<media type>;base64,`" in refused.value.message, refused.value.message
            assert "local paths" not in refused.value.message and sent[:100] not in refused.value.message


def test_a_file_whose_name_reads_as_base64_is_still_a_path(tmp_path):
    name = "A" * 70
    random_image(3).save(tmp_path / name, format="PNG")
    assert load_medium(name, MediaPolicy(root=tmp_path)).size == random_image(3).size
    with pytest.raises(APIError, match="local paths are refused"):
        load_medium("cats/cat.png", MediaPolicy())
