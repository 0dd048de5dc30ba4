"""OpenAI's fields as its clients send them (serve/protocol.py, serve/logprobs.py, runtime/data_url.py), through the
official `openai` client: a reply sent back as the client dumps it (`message.model_dump()`, an output item's) is a
turn like any other; OpenAI's no-op fields are taken and change nothing, its fields of features this server has not
are taken null and refused when set, with one message for tools on all three endpoints; completions' `top_logprobs`
hold the sampled token, as OpenAI's do; a data URL's base64 is read as browsers read it."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch

from flamingo.model.logprobs import TokenLogprobs
from flamingo.runtime.data_url import decode_data_url
from flamingo.serve.logprobs import CompletionLogprobs, TokenStrings
from flamingo.tiny import random_image, tiny_tokenizer

from serve_helpers import data_url, openai_client, serving_tiny

USER = {"role": "user", "content": "Question: what is in the image? Short answer:"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving_tiny(tmp_path_factory.mktemp("serve_openai_fields"), max_batch=8, prefill_chunk=16) as served:
        yield served


def _chat(url, messages, **fields):
    return openai_client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                                      **fields)


@pytest.mark.parametrize("logprobs", [0, 1, 3])
def test_completion_top_logprobs_hold_the_sampled_token(served, logprobs):
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements": each position's dict holds its token with the token's own value (`logprobs: 0`: the token alone),
    sampled far from the likeliest (temperature 2) and echoed."""
    _, url = served
    for echo in (False, True):
        reply = openai_client(url).completions.create(model="tiny", prompt="Output:", max_tokens=12, temperature=2,
                                                      seed=3, logprobs=logprobs, echo=echo)
        lp = reply.choices[0].logprobs
        rows = [(t, v, top) for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs) if v is not None]
        assert rows
        for token, value, top in rows:
            assert top[token] == value and len(top) <= logprobs + 1, (token, value, top)
            if logprobs == 0:
                assert top == {token: value}


def test_a_byte_tokens_key_holds_its_own_value():
    """Byte tokens all read "\ufffd": the sampled one's value holds that key, not a likelier byte token's."""
    tokenizer = tiny_tokenizer()
    lead, tail = tokenizer.encode("\u00e9", add_special_tokens=False)  # 0xC3 0xA9
    logprobs = TokenLogprobs(torch.tensor([-2.0]), torch.tensor([[tail, lead]]), torch.tensor([[-0.5, -2.0]]))
    top = CompletionLogprobs(TokenStrings(tokenizer)).add([lead], logprobs)["top_logprobs"]
    assert top == [{"\ufffd": -2.0}]


def test_chat_top_logprobs_are_the_k_likeliest(served):
    """Chat's `top_logprobs` list is OpenAI's: exactly the position's k likeliest (the token among them or not),
    none with `top_logprobs: 0`."""
    _, url = served
    for k in (0, 2):
        reply = openai_client(url).chat.completions.create(model="tiny", messages=[USER], max_tokens=6, temperature=2,
                                                           seed=5, logprobs=True, top_logprobs=k)
        for entry in reply.choices[0].logprobs.content:
            assert len(entry.top_logprobs) == k
            assert [e.logprob for e in entry.top_logprobs] == sorted((e.logprob for e in entry.top_logprobs),
                                                                     reverse=True)
            if k:
                assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
