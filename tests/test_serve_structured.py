"""Structured outputs (`response_format`, serve/structured.py): every answer of a JSON-schema request parses and
follows the schema, greedy or sampled, streamed or whole, alone or beside free rows; the constrained greedy tokens
equal uncached greedy decoding under the grammar's own token masks; a free row beside constrained ones decodes as
alone; bad formats get a clear 400."""

from __future__ import annotations

import json

import httpx
import llguidance
import llguidance.hf
import pytest
import torch

from flamingo.serve.engine import Engine
from flamingo.serve.sampling import SamplingParams
from flamingo.serve.structured import Grammars
from flamingo.tiny import random_image

from serve_helpers import SHOT, data_url, openai_client, serving_tiny, submit_job

QUERY = "<image>Question: what is in the image? Short answer:"
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "label": {"type": "string", "maxLength": 5},
        "round": {"type": "boolean"},
    },
    "required": ["color", "count", "label", "round"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}


def _follows_schema(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"color", "count", "label", "round"} and value["color"] in ("red", "green", "blue")
            and type(value["count"]) is int and 0 <= value["count"] <= 99 and isinstance(value["label"], str)
            and len(value["label"]) <= 5 and type(value["round"]) is bool)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving_tiny(tmp_path_factory.mktemp("serve_structured"), max_batch=8, prefill_chunk=16) as served:
        yield served


def _messages(seed):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(random_image(seed))}},
                                         {"type": "text", "text": "Describe the shape as JSON."}]}]


def test_every_answer_follows_the_schema_greedy_sampled_and_streamed(served):
    _, url = served
    client = openai_client(url)
    greedy = client.chat.completions.create(model="tiny", messages=_messages(1), max_tokens=64, temperature=0,
                                            response_format=FORMAT)
    assert greedy.choices[0].finish_reason == "stop" and _follows_schema(greedy.choices[0].message.content)
    sampled = client.chat.completions.create(model="tiny", messages=_messages(2), max_tokens=64, temperature=1.0,
                                             n=4, seed=3, response_format=FORMAT)
    texts = [c.message.content for c in sampled.choices]
    assert all(c.finish_reason == "stop" for c in sampled.choices) and all(_follows_schema(t) for t in texts)
    assert len(set(texts)) > 1  # sampled within the grammar, not one forced answer
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=_messages(1), max_tokens=64, temperature=0, response_format=FORMAT, stream=True)
        if chunk.choices)
    assert streamed == greedy.choices[0].message.content
    free = client.chat.completions.create(model="tiny", messages=_messages(1), max_tokens=24, temperature=0)
    with pytest.raises(ValueError):  # the SHARP tiny model's free answer is no JSON: the grammar did the work
        json.loads(free.choices[0].message.content)
    raw = httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": SHOT + QUERY, "media": [data_url(random_image(1)), data_url(random_image(4))], "max_tokens": 64,
        "temperature": 0, "response_format": {"type": "json_object"}}).json()
    if raw["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(raw["choices"][0]["text"]), dict)
    else:  # a free-form object the model kept extending: cut at max_tokens, an object's beginning
        assert raw["choices"][0]["text"].startswith("{")


def _reference(engine, prompt, media, steps):
    """Greedy tokens of uncached forwards, each step masked by llguidance's own bitmask for the same schema."""
    tokenizer = engine.processor.tokenizer
    vocab = engine.model.lm.get_output_embeddings().weight.shape[0]
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=sorted(engine.eos)),
                                   llguidance.LLMatcher.grammar_from_json_schema(
                                       json.dumps(SCHEMA), overrides={"whitespace_flexible": False}))
    batch = engine.processor(prompt, images=media)
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    answer = []
    for _ in range(steps):
        ids = torch.tensor([batch["input_ids"][0].tolist() + answer])
        with torch.no_grad():
            logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **rest).logits[0, -1].float()
        bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits[:, None] >> torch.arange(8)) & 1).flatten()[:vocab].bool()  # token i: bit i % 8 of byte i // 8
        logits[~allowed] = -float("inf")
        logits[engine.suppress] = -float("inf")
        answer.append(int(logits.argmax()))
        matcher.consume_token(answer[-1])
        if matcher.is_stopped() or answer[-1] in engine.eos:
            break
    return answer


def test_constrained_greedy_equals_uncached_decoding_under_the_grammar_beside_free_rows(served):
    """Constrained and free requests queued together (so they share decode steps): each constrained answer is the
    greedy decoding of uncached forwards under the grammar's masks, each free one is its answer alone."""
    engine, _ = served
    grammars = Grammars(engine.processor.tokenizer, engine.model.lm.get_output_embeddings().weight.shape[0],
                        sorted(engine.eos))
    jobs = [(SHOT + QUERY, [random_image(1), random_image(60 + i)]) for i in range(4)]
    params = SamplingParams(96, temperature=0.0)
    free_alone = [submit_job(engine, p, m, params)()[0] for p, m in jobs[2:]]
    together = Engine(engine.model, engine.processor, max_batch=8, prefill_chunk=16)
    waits = [submit_job(together, p, m, params, grammars.compile(FORMAT) if k < 2 else None)
             for k, (p, m) in enumerate(jobs)]
    together.start()
    try:
        finished = [next(e for e in wait()[1] if e.kind == "finish") for wait in waits]
    finally:
        together.stop(0.0)
    for (prompt, media), finish in zip(jobs[:2], finished[:2]):
        assert finish.finish_reason == "stop", repr(engine.processor.decode(finish.tokens))
        assert finish.tokens == _reference(engine, prompt, media, 96)
        assert _follows_schema(engine.processor.decode(finish.tokens))
    assert [f.tokens for f in finished[2:]] == free_alone


@pytest.mark.parametrize("response_format,says", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
    ({"type": "json_schema"}, "needs its json_schema"),
    ({"type": "xml"}, "response_format"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name"),
])
def test_bad_response_formats_get_a_clear_400(served, response_format, says):
    _, url = served
    body = {"messages": [{"role": "user", "content": "Say:"}], "max_tokens": 4, "response_format": response_format}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]
    assert httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say:"}],
                                                          "max_tokens": 1}, timeout=60).status_code == 200


# llguidance (1.9) builds these badly: the first three crashed the process (SIGSEGV, no traceback) while the matcher
# was built, the next two answered 9223372036854775807 (outside the range) with `stop`, the last took minutes
UNTAKEABLE = [
    ({"type": "integer", "minimum": -(2**63), "maximum": -(2**63)}, "2**53"),
    ({"type": "integer", "minimum": -1e19, "maximum": -1e19}, "2**53"),
    ({"type": "object", "properties": {"default": {"type": "integer", "minimum": -2e19, "maximum": -1e19}},
      "required": ["default"]}, "2**53"),
    ({"type": "integer", "minimum": 1e19, "maximum": 2e19}, "2**53"),
    ({"type": "number", "minimum": 1.5e308, "maximum": 1.7e308}, "2**53"),
    ({"type": "integer", "multipleOf": 2147483648}, "significant digits"),
]


def test_numbers_llguidance_cannot_take_are_400_and_the_server_keeps_serving(served):
    """Bounds beyond +-2**53 (anywhere in the schema) and a `multipleOf` of many digits are refused before llguidance
    sees them: a 400 naming the field, and the server answers the next request."""
    _, url = served
    messages = []
    for schema, says in UNTAKEABLE:
        body = {"messages": [{"role": "user", "content": "Say:"}], "max_tokens": 8,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, (schema, response.text)
        error = response.json()["error"]
        assert says in error["message"] and error["param"] == "response_format", error
        messages.append(error["message"])
    assert "schema.properties.default.minimum = -2e+19" in messages[2]  # the field, wherever it is
    within = {"type": "integer", "minimum": -(2**53), "maximum": 2**53, "multipleOf": 7}
    answer = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        **body, "max_tokens": 30, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": within}}}).json()
    value = json.loads(answer["choices"][0]["message"]["content"])
    assert answer["choices"][0]["finish_reason"] == "stop" and abs(value) <= 2**53 and value % 7 == 0
    assert httpx.get(url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("schema", [
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},  # a `$ref` loop: no value at all
    {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
     "$ref": "#/$defs/n"},  # an object that must hold itself: its forced start exceeds the parser's limits
])
def test_a_schema_that_cannot_be_followed_is_400_not_an_empty_stop(served, schema):
    """Both compiled and then answered "" or "{" with `finish_reason: stop`: now the format's first steps are walked
    when it compiles."""
    _, url = served
    response = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Say:"}], "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert response.status_code == 400, response.text
    assert "cannot be followed" in response.json()["error"]["message"]


class _BreaksAfter:
    """A matcher that follows the real one for `tokens` tokens, then is in error (a parser limit hit mid-answer)."""

    def __init__(self, matcher, tokens: int) -> None:
        self.matcher, self.left = matcher, tokens

    def compute_logit_bias(self) -> bytes:
        return self.matcher.compute_logit_bias()

    def consume_token(self, token: int) -> bool:
        self.left -= 1
        return self.matcher.consume_token(token) and self.left > 0

    def is_error(self) -> bool:
        return self.left <= 0

    def is_stopped(self) -> bool:
        return self.left <= 0 or self.matcher.is_stopped()

    def get_error(self) -> str:
        return "parser error: Too many items (limit 50000)\n<state>...</state>"


def test_a_grammar_that_breaks_mid_answer_fails_the_request_never_a_stop(served, monkeypatch):
    """A matcher in error after 3 tokens (what a parser limit does to a large schema): the request is a 500 naming
    llguidance's error, streamed or not (before: `finish_reason: stop` with 3 tokens of JSON); the server goes on."""
    from flamingo.serve.structured import Constraint, Grammar

    monkeypatch.setattr(Grammar, "constraint", lambda self: Constraint(_BreaksAfter(self._prototype.deep_copy(), 3)))
    _, url = served
    body = {"messages": _messages(1), "max_tokens": 40, "temperature": 1.0, "n": 2, "seed": 1,
            "response_format": FORMAT}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 500, response.text
    assert "grammar failed mid-answer: parser error: Too many items" in response.json()["error"]["message"]
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as streamed:
        events = [json.loads(x[6:]) for x in streamed.iter_lines() if x.startswith("data: {")]
    assert "grammar failed mid-answer" in events[-1]["error"]["message"]
    assert not [c for e in events for c in e.get("choices", []) if c["finish_reason"] == "stop"]
    monkeypatch.undo()
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_template_stops_never_cut_structured_json_but_the_requests_stop_does(served):
    """The mmgpt format ends free answers at `### End.`; a format's grammar decides where a JSON answer ends, so a
    string holding it is answered whole (before: cut to '{"note":"' with `stop`). The request's own `stop` applies
    as OpenAI's does (its structured-outputs guide: with stop sequences, `stop` may be a cut)."""
    import copy

    from flamingo.serve.app import ServeSettings

    from serve_helpers import running_server

    engine, _ = served
    processor = copy.copy(engine.processor)
    processor.template = "mmgpt"
    schema = {"type": "object", "properties": {"note": {"const": "### End. ok"}}, "required": ["note"],
              "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "Say:"}], "max_tokens": 30, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    with running_server(Engine(engine.model, processor, max_batch=2), ServeSettings(model_name="tiny")) as url:
        assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["chat_template"] == "mmgpt"
        whole = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        assert (whole["finish_reason"], whole["message"]["content"]) == ("stop", '{"note":"### End. ok"}')
        cut = httpx.post(url + "/v1/chat/completions", json={**body, "stop": ["End"]}, timeout=60).json()["choices"][0]
        assert (cut["finish_reason"], cut["message"]["content"]) == ("stop", '{"note":"### ')


def test_bounds_are_read_from_schemas_not_from_data_values():
    """`examples`, `default`, `const` and `enum` hold JSON data: a key `maximum` there is no bound (such schemas
    compile); a property that happens to be named `default` or `examples` is a schema and is checked."""
    from flamingo.serve.structured import GrammarError, check_numbers

    data = {"maximum": 1e20, "minimum": -1e20, "multipleOf": 123456789}
    check_numbers({"type": "object", "examples": [data], "default": data, "const": data, "enum": [data],
                   "properties": {"x": {"type": "object", "default": data}}})
    for name in ("default", "examples", "enum"):
        with pytest.raises(GrammarError, match=rf"schema.properties.{name}.maximum = 1e\+20"):
            check_numbers({"type": "object", "properties": {name: {"type": "number", "maximum": 1e20}}})
    with pytest.raises(GrammarError, match=r"schema.\$defs.a.minimum"):
        check_numbers({"$defs": {"a": {"type": "integer", "minimum": -1e20}}, "$ref": "#/$defs/a"})
