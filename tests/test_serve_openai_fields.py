"""OpenAI's fields as its clients send them (serve/protocol.py, serve/logprobs.py, runtime/data_url.py), through the
official `openai` client: a reply sent back as the client dumps it (`message.model_dump()`, an output item's) is a
turn like any other; OpenAI's no-op fields are taken and change nothing, its fields of features this server has not
are taken null and refused when set, with one message for tools on all three endpoints; completions' `top_logprobs`
hold the sampled token, as OpenAI's do; a data URL's base64 is read as browsers read it."""

from __future__ import annotations

import base64
import io
import json
from typing import Literal

import httpx
import pydantic
import pytest
import torch

from flamingo.model.logprobs import TokenLogprobs
from flamingo.runtime.data_url import decode_data_url, media_kind
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


def test_a_reply_sent_back_as_the_client_dumps_it_is_a_turn(served):
    """`message.model_dump()` (null `refusal`, `audio`, `function_call`, `tool_calls`, `annotations`), the same as
    stored JSON, and the pydantic object itself all continue the conversation with the same answer."""
    _, url = served
    message = _chat(url, [USER]).choices[0].message
    answers = set()
    for sent in (message, message.model_dump(), json.loads(message.model_dump_json()),
                 {"role": "assistant", "content": message.content, "refusal": None, "annotations": []}):
        answers.add(_chat(url, [USER, sent, USER]).choices[0].message.content)
    assert len(answers) == 1


def test_a_responses_output_item_sent_back_is_a_turn(served):
    """An output item as the client dumps it (`id`, `status`, `phase: null`, its part's `annotations`,
    `logprobs`) is the same assistant turn as the plain message."""
    _, url = served
    client = openai_client(url)
    user = {"role": "user", "content": USER["content"]}
    out = client.responses.create(model="tiny", input=[user], max_output_tokens=4, temperature=0)
    dumped = [{"phase": None, **item.model_dump()} for item in out.output]  # openai 2.0's items have no phase
    plain = {"role": "assistant", "content": out.output_text}
    again = [client.responses.create(model="tiny", input=[user, *turn, user], max_output_tokens=4,
                                     temperature=0).output_text for turn in (dumped, [plain])]
    assert again[0] == again[1]


class Shape(pydantic.BaseModel):
    color: Literal["red", "green", "blue"]


def test_a_reply_from_the_clients_parse_helpers_is_a_turn(served):
    """The `parse` helpers add `parsed` (the answer read by the schema) to the chat message and to each Responses
    output_text part: sent back (object, dump, or `parsed` null as without a schema), it is ignored, the text is the
    turn."""
    _, url = served
    client = openai_client(url)
    message = client.chat.completions.parse(model="tiny", messages=[USER], max_tokens=32, temperature=0,
                                            response_format=Shape).choices[0].message
    assert isinstance(message.parsed, Shape)
    answers = {_chat(url, [USER, sent, USER]).choices[0].message.content
               for sent in (message, message.model_dump(), {**message.model_dump(), "parsed": None},
                            {"role": "assistant", "content": message.content})}
    assert len(answers) == 1
    user = {"role": "user", "content": USER["content"]}
    out = client.responses.parse(model="tiny", input=[user], max_output_tokens=32, temperature=0, text_format=Shape)
    assert isinstance(out.output_parsed, Shape)
    dumped = [{"phase": None, **item.model_dump()} for item in out.output]  # openai 2.0's items have no phase
    plain = {"role": "assistant", "content": out.output_text}
    again = {client.responses.create(model="tiny", input=[user, *turn, user], max_output_tokens=4,
                                     temperature=0).output_text for turn in (dumped, [plain])}
    assert len(again) == 1


@pytest.mark.parametrize("sent, says", [
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "tools are not supported"),
    ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "tools are not supported"),
    ({"role": "assistant", "content": "hi", "function_call": {"name": "f", "arguments": "{}"}},
     "tools are not supported"),
    ({"role": "assistant", "content": "hi", "audio": {"id": "audio_1"}}, "audio is not supported"),
    ({"role": "assistant", "content": None, "refusal": "I can't."}, "refusal is not supported"),
    ({"role": "assistant", "content": "hi", "annotations": "none"}, "annotations"),
    ({"role": "assistant", "content": "hi", "reasoning": None}, "Unrecognized request argument supplied"),
])
def test_what_a_reply_of_this_server_never_holds_is_refused_clearly(served, sent, says):
    _, url = served
    response = httpx.post(url + "/v1/chat/completions", json={"messages": [USER, sent, USER], "max_tokens": 2},
                          timeout=60)
    assert response.status_code == 400 and says in response.json()["error"]["message"], response.text
    assert response.json()["error"]["param"].startswith("messages.1")


NO_OPS = {"store": True, "metadata": {"run": "a"}, "service_tier": "auto", "prompt_cache_key": "k",
          "safety_identifier": "s", "user": "u", "parallel_tool_calls": False, "tool_choice": "none"}
# OpenAI fields of features this server has not, as a client that sends every field sends them
NULLS = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "modalities": ["text"],
         "audio": None, "prediction": None, "reasoning_effort": None, "web_search_options": None, "verbosity": None,
         "parallel_tool_calls": None, "store": None, "metadata": None, "service_tier": None}


def test_openai_no_op_fields_are_taken_and_change_nothing(served):
    _, url = served
    plain = _chat(url, [USER]).choices[0].message.content
    assert _chat(url, [USER], **NO_OPS).choices[0].message.content == plain
    assert _chat(url, [USER], extra_body=NULLS).choices[0].message.content == plain
    assert _chat(url, [USER], reasoning_effort="none").choices[0].message.content == plain  # asks for no reasoning
    client = openai_client(url)
    text = client.completions.create(model="tiny", prompt="Output:", max_tokens=4, temperature=0).choices[0].text
    for fields in ({"best_of": 1, "suffix": None, **NO_OPS}, {"best_of": None, "suffix": ""}):
        again = client.completions.create(model="tiny", prompt="Output:", max_tokens=4, temperature=0,
                                          extra_body=fields)
        assert again.choices[0].text == text
    out = client.responses.create(model="tiny", input="Output:", max_output_tokens=4, temperature=0,
                                  **{k: v for k, v in NO_OPS.items() if k != "store"}, store=False)
    assert out.metadata == {"run": "a"} and out.store is False


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [USER], "tools": [TOOL]}),
    ("/v1/chat/completions", {"messages": [USER], "tool_choice": "required"}),
    ("/v1/chat/completions", {"messages": [USER], "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("/v1/chat/completions", {"messages": [USER], "functions": [{"name": "f"}]}),
    ("/v1/completions", {"prompt": "Output:", "tools": [TOOL]}),
    ("/v1/responses", {"input": "Output:", "tools": [{"type": "function", "name": "f"}]}),
    ("/v1/responses", {"input": "Output:", "tool_choice": "required"}),
])
def test_tools_are_refused_with_one_message_on_every_endpoint(served, path, body):
    _, url = served
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 400 and "tools are not supported by this server" in \
        response.json()["error"]["message"], response.text


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "x", "best_of": "1"}, "best_of", "valid integer"),
    ("/v1/chat/completions", {"messages": [USER], "store": "yes"}, "store", "valid boolean"),
    ("/v1/chat/completions", {"messages": [USER], "metadata": {"a": 1}}, "metadata.a", "valid string"),
    ("/v1/chat/completions", {"messages": [USER], "service_tier": "fast"}, "service_tier", "'auto'"),
    ("/v1/chat/completions", {"messages": [USER], "modalities": ["text", "audio"]}, "modalities", "not supported"),
    ("/v1/chat/completions", {"messages": [USER], "reasoning_effort": "low"}, "reasoning_effort", "not supported"),
    ("/v1/chat/completions", {"messages": [USER], "frobnicate": None}, "frobnicate", "Unrecognized"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate", "Unrecognized"),
])
def test_openai_fields_are_typed_and_unknown_ones_stay_refused(served, path, body, param, says):
    _, url = served
    error = httpx.post(url + path, json=body, timeout=60).json()["error"]
    assert error["param"] == param and says in error["message"], error


def _png() -> bytes:
    buffer = io.BytesIO()
    random_image(4).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("encode", [
    lambda b: base64.encodebytes(b).decode(),  # 76-column lines, as GNU `base64` writes them
    lambda b: base64.encodebytes(b).decode().replace("\n", "\r\n"),
    lambda b: " " + base64.b64encode(b).decode().rstrip("=") + "\n",  # unpadded
    lambda b: base64.b64encode(b).decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D"),
])
def test_a_data_urls_base64_is_read_as_browsers_read_it(encode):
    """WHATWG's data: URL processor: percent-escapes decoded, then forgiving-base64 (ASCII whitespace dropped,
    `=` padding optional)."""
    data = _png()[:-1]  # a length that needs padding
    assert decode_data_url("data:image/png;base64," + encode(data)) == ("image/png", data)


@pytest.mark.parametrize("head", ["data:image/png; base64,", "data:image/png;  BASE64 ,", "data:image/png;x=1; Base64,",
                                  "data:image/png ;base64,", "data: image/png;base64,", "data:\timage/png \t;base64,"])
def test_spaces_around_a_data_urls_base64_token_are_read_as_browsers_read_them(head):
    """WHATWG's data: URL processor takes `;`, spaces, `base64` (any case), and whitespace before the comma; the
    media type is stripped of whitespace around it."""
    data = _png()
    assert decode_data_url(head + base64.b64encode(data).decode()) == ("image/png", data)


def test_a_data_url_without_a_media_type_is_told_to_name_one():
    mime, _ = decode_data_url("data:;base64," + base64.b64encode(_png()).decode())
    with pytest.raises(ValueError, match="unsupported media type: the data URL names none") as error:
        media_kind(mime)
    assert "'none'" not in str(error.value)


@pytest.mark.parametrize("payload, says", [("%%%", "'%'"), ("aG-k", "'-'"), ("a=Gk", "'=', which is not base64 there"),
                                           ("aGkxa", "length"), ("aGk===", "'='"), ("QQ=", "'='")])
def test_other_junk_in_a_data_urls_base64_is_named(payload, says):
    with pytest.raises(ValueError, match="base64 does not decode") as error:
        decode_data_url("data:image/png;base64," + payload)
    assert says in str(error.value)


def test_a_line_wrapped_data_url_is_the_same_image_over_http(served):
    _, url = served
    raw = _png()
    wrapped = "data:image/png;base64," + base64.encodebytes(raw).decode()
    answers = [_chat(url, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                                        {"type": "text", "text": USER["content"]}]}],
                     ).choices[0].message.content for u in (wrapped, data_url(random_image(4)))]
    assert answers[0] == answers[1]


def test_the_responses_apis_null_and_no_op_fields_are_taken_and_features_refused():
    """Every field the Responses API defines, sent as "none of it" (a client that sends all of them), was
    "Unrecognized"; asking for a feature this server lacks is refused by name."""
    from flamingo.serve.protocol import APIError, ChatCompletionRequest, ResponsesRequest, parse

    none = {"include": [], "reasoning": None, "background": False, "max_tool_calls": None, "conversation": None,
            "top_logprobs": 0, "stream_options": {"include_obfuscation": False}, "prompt": None}
    parse(ResponsesRequest, {"input": "hi", **none}).check()
    parse(ResponsesRequest, {"input": "hi", "reasoning": {"effort": "none", "summary": None}}).check()  # no reasoning
    parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}],
                                  "stream_options": {"include_usage": True, "include_obfuscation": True}})
    for field, value in [("include", ["message.output_text.logprobs"]), ("reasoning", {"effort": "low"}),
                         ("background", True), ("top_logprobs", 2), ("conversation", "conv_1"),
                         ("prompt", {"id": "pmpt_1"})]:
        with pytest.raises(APIError) as refused:
            parse(ResponsesRequest, {"input": "hi", field: value}).check()
        assert refused.value.param == field and refused.value.status == 400, field
