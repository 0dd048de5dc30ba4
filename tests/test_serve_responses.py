"""OpenAI's Responses API (`/v1/responses`) through the official client: the answer to a conversation (images,
replayed assistant turns, instructions) is the greedy answer to the prompt the chat template writes for it, whole or
streamed (the client's own stream helper checks the events' order); `max_output_tokens` ends it as `incomplete`;
`text.format` applies the schema; what the server cannot do (stored responses, tools, file ids) is a clear 400."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from flamingo.chat import BLANKS
from flamingo.tiny import random_image

from serve_helpers import data_url, greedy_alone, openai_client, serving_tiny

QUESTION = "Question: what is in the image? Short answer:"


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving_tiny(tmp_path_factory.mktemp("serve_responses"), max_batch=8, prefill_chunk=16) as served:
        yield served


def _conversation():
    """Responses input items, the Flamingo prompt the template makes of them, and their images."""
    images = [random_image(1), random_image(2)]
    items = [
        {"role": "user", "content": [{"type": "input_image", "image_url": data_url(images[0])},
                                     {"type": "input_text", "text": QUESTION}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a red circle."}]},
        {"role": "user", "content": [{"type": "input_image", "image_url": data_url(images[1]), "detail": "auto"},
                                     {"type": "input_text", "text": QUESTION}]},
    ]
    prompt = f"Answer briefly.\n<image>{QUESTION} a red circle.<|endofchunk|><image>{QUESTION}"
    return items, prompt, images


def _expected(engine, prompt, images, max_tokens):
    """The greedy answer (its stop token dropped, leading blanks stripped as chat answers are) and its status."""
    tokens = greedy_alone(engine, prompt, images, max_tokens)
    stopped = bool(tokens) and tokens[-1] in engine.eos
    text = engine.processor.decode(tokens[:-1] if stopped else tokens).lstrip(BLANKS)
    return text, len(tokens), "completed" if stopped else "incomplete"


def test_a_response_is_the_greedy_answer_to_the_conversation(served):
    engine, url = served
    items, prompt, images = _conversation()
    out = openai_client(url).responses.create(model="tiny", input=items, instructions="Answer briefly.\n",
                                              max_output_tokens=10, temperature=0, metadata={"run": "a"})
    text, count, status = _expected(engine, prompt, images, 10)
    assert out.output_text == text and out.status == status
    assert out.object == "response" and out.id.startswith("resp_") and out.metadata == {"run": "a"}
    message = out.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert (out.incomplete_details is not None) == (status == "incomplete")
    assert out.usage.output_tokens == count
    assert out.usage.input_tokens == len(engine.processor(prompt, images=images)["input_ids"][0])
    assert out.usage.total_tokens == out.usage.input_tokens + count
    # a plain text input is one user message, as a chat of one message is
    chat = openai_client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=6, temperature=0)
    plain = openai_client(url).responses.create(model="tiny", input="Hi", max_output_tokens=6, temperature=0)
    assert plain.output_text == chat.choices[0].message.content
    assert engine.metrics.value("requests_total", {"endpoint": "/v1/responses", "status": "200"}) >= 2


def test_a_streamed_response_is_the_whole_one(served):
    engine, url = served
    items, prompt, images = _conversation()
    client = openai_client(url)
    kwargs = dict(model="tiny", input=items, instructions="Answer briefly.\n", max_output_tokens=12, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text != ""
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    with client.responses.stream(**kwargs) as stream:  # the client's helper checks and accumulates the events
        last = list(stream)[-1]
    assert last.type == f"response.{whole.status}" and last.response.output_text == whole.output_text


def test_text_format_applies_the_schema(served):
    _, url = served
    schema = {"type": "object", "properties": {"round": {"type": "boolean"}}, "required": ["round"],
              "additionalProperties": False}
    out = openai_client(url).responses.create(
        model="tiny", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(random_image(3))},
            {"type": "input_text", "text": "Is it round? Answer as JSON."}]}],
        max_output_tokens=32, temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert out.status == "completed" and type(json.loads(out.output_text)["round"]) is bool
    assert out.text.format.type == "json_schema"


@pytest.mark.parametrize("body, message", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "keeps no responses"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}]}, "tools are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "needs its image_url"),
    ({"input": []}, "input is empty"),
    ({"input": "hi", "seed": 3}, "Unrecognized request argument supplied: seed"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio", "data": ""}]}]}, "input"),
    ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "needs its name and schema"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": "an <image> here"}]}, "may not contain <image>"),
])
def test_requests_the_server_cannot_answer_are_a_clear_400(served, body, message):
    _, url = served
    r = httpx.post(url + "/v1/responses", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):  # the official client raises it as OpenAI's own 400
        openai_client(url).responses.create(model="tiny", extra_body=body)
    assert openai_client(url).responses.create(model="tiny", input="ok", max_output_tokens=2).status  # still serving


def test_errors_name_the_responses_field(served):
    _, url = served
    r = httpx.post(url + "/v1/responses", json={"model": "tiny", "input": "hi " * 5000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "input"
    for body, field in (({"input": "hi", "max_output_tokens": 10**6}, "max_output_tokens"),
                        ({"input": [{"role": "assistant", "content": "hi"}]}, "input")):
        r = httpx.post(url + "/v1/responses", json={"model": "tiny", **body}, timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == field, error
        assert "max_tokens" not in error["message"] and "messages" not in error["message"], error


@pytest.mark.parametrize("body, where, param", [
    ({"instructions": "be brief", "input": [{"role": "user", "content": "<image>x"}]}, "input[0]", "input"),
    ({"instructions": "be brief", "input": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        {"role": "user", "content": "and?"}]}, "input[1]", "input"),
    ({"instructions": "an <image> here", "input": "hi"}, "instructions", "instructions"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "user", "content": "<image>"}]}, "input[1]", "input"),
])
def test_errors_name_the_input_item_at_fault(served, body, where, param):
    """`instructions` go first into the conversation: an error names the item of `input` (or the instructions)
    the client sent, not its place in the chat request it became."""
    _, url = served
    r = httpx.post(url + "/v1/responses", json={"model": "tiny", **body}, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["message"].startswith(where + ":") and error["param"] == param, error


def test_responses_and_events_validate_strictly_as_the_sdks_types(served):
    """What the openai SDK's own pydantic types require (`usage.input_tokens_details.cache_write_tokens` among them:
    0, nothing is billed for the prefix cache's stores), strictly, for a whole response and every streamed event,
    completed or incomplete."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    _, url = served
    events = TypeAdapter(ResponseStreamEvent)
    schema = {"type": "object", "properties": {"round": {"type": "boolean"}}, "required": ["round"],
              "additionalProperties": False}
    statuses = set()
    for max_tokens, text in ((2, None), (32, {"format": {"type": "json_schema", "name": "a", "schema": schema}})):
        body = {"model": "tiny", "input": "Is it round?", "max_output_tokens": max_tokens, "temperature": 0,
                "text": text}
        whole = Response.model_validate(httpx.post(url + "/v1/responses", json=body, timeout=30).json(), strict=True)
        assert whole.usage.input_tokens_details.cache_write_tokens == 0
        with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}, timeout=30) as r:
            sent = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
        last = [events.validate_python(event, strict=True) for event in sent][-1]
        assert last.type == f"response.{whole.status}" and last.response.usage == whole.usage
        statuses.add(whole.status)
    assert statuses == {"completed", "incomplete"}
