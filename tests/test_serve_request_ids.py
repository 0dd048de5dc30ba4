"""What the server tells an operator about one request: every response carries an `X-Request-Id` (the client's own
when sane, else a new one in OpenAI's form, which the openai client reads as `_request_id`), the log lines about the
request name it (uvicorn's access line, the traceback of a 500, the engine's line for a request that fails while
generating, written once however many choices it has), and a stream that fails after its 200 went out is counted
in `flamingo_stream_errors_total`."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest

from flamingo.detokenize import IncrementalText
from flamingo.serve.app import ServeSettings
from flamingo.serve.middleware import MAX_REQUEST_ID, request_id

from serve_helpers import engine_for, openai_client, running_server, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
GENERATED = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ids") / "model")


def test_which_ids_a_client_may_give():
    assert request_id("trace-7f3a/b:1") == "trace-7f3a/b:1"
    assert request_id("x" * MAX_REQUEST_ID) == "x" * MAX_REQUEST_ID
    for bad in (None, "", "x" * (MAX_REQUEST_ID + 1), "a\nINFO forged line", "tab\there", "café", " padded"):
        assert GENERATED.fullmatch(request_id(bad)), bad


def test_every_response_carries_its_request_id(model_dir, capsys):
    engine = engine_for(model_dir)
    with running_server(engine, ServeSettings(model_name="tiny", api_key="k"), log_level="info") as url:
        client = openai_client(url)
        client.api_key = "k"
        answer = client.completions.create(model="tiny", prompt="Say:", max_tokens=2)
        assert GENERATED.fullmatch(answer._request_id)
        again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2, extra_headers={"X-Request-Id": "client-trace-1"})
        assert again._request_id == "client-trace-1"
        with client.chat.completions.with_streaming_response.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True,
                extra_headers={"X-Request-Id": "client-trace-2"}) as streamed:
            assert streamed.headers["x-request-id"] == "client-trace-2"
        refused = httpx.post(url + "/v1/completions", json={"prompt": "a"}, headers={"X-Request-Id": "no-key"})
        unsafe = httpx.get(url + "/health", headers={"X-Request-Id": "a" * (MAX_REQUEST_ID + 1)})
        missing = httpx.get(url + "/no/such/route")
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key"
    assert unsafe.status_code == 200 and GENERATED.fullmatch(unsafe.headers["x-request-id"])
    assert missing.status_code == 404 and GENERATED.fullmatch(missing.headers["x-request-id"])
    access = capsys.readouterr().out.splitlines()  # uvicorn's access lines end with the id
    assert any('"POST /v1/chat/completions HTTP/1.1" 200' in line and line.endswith(" client-trace-1")
               for line in access), access
    assert any(line.endswith(f" {answer._request_id}") for line in access), access


def test_a_500_is_logged_once_with_its_id_and_answers_it(model_dir, monkeypatch, caplog, capsys):
    engine = engine_for(model_dir)
    with running_server(engine, ServeSettings(model_name="tiny"), start_engine=False) as url:
        monkeypatch.setattr(engine, "submit_all", lambda *a, **k: 1 / 0)
        with caplog.at_level(logging.ERROR):
            failed = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                                headers={"X-Request-Id": "the-500"})
        counted = httpx.get(url + "/metrics").text
    assert failed.status_code == 500 and failed.headers["x-request-id"] == "the-500"
    assert failed.json()["error"]["message"] == "internal error: ZeroDivisionError"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "the-500" in tracebacks[0].getMessage()
    assert "Exception in ASGI application" not in capsys.readouterr().err  # uvicorn's own, without the id
    assert 'flamingo_requests_total{endpoint="/v1/completions",status="500"} 1' in counted


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
def test_a_stream_that_fails_after_its_200_is_counted_and_logged_once(model_dir, monkeypatch, caplog, path):
    """n=3 choices fail in one decode step (their text cannot be decoded from their 3rd token on): one log line
    naming the request, one error event; `requests_total` counted the 200 the stream began with."""
    real = IncrementalText.add

    def add(self, token):
        self.taken = getattr(self, "taken", 0) + 1
        if self.taken >= 3:
            raise RuntimeError("detok bug")
        return real(self, token)

    monkeypatch.setattr(IncrementalText, "add", add)
    body = {"prompt": "Say:"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    body = {"input": "Hi", "max_output_tokens": 8} if path == "/v1/responses" else {**body, "max_tokens": 8, "n": 3}
    engine = engine_for(model_dir)
    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        with caplog.at_level(logging.ERROR):
            with httpx.stream("POST", url + path, json={**body, "stream": True, "temperature": 0},
                              headers={"X-Request-Id": "fails-late"}, timeout=60) as response:
                status, events = response.status_code, [line for line in response.iter_lines() if line]
        counted = engine.metrics.render()
    assert status == 200
    errors = [line for line in events if line.startswith("data: ") and line != "data: [DONE]"
              and ("error" in json.loads(line[6:]) or json.loads(line[6:]).get("type") == "error")]
    assert len(errors) == 1, events
    lines = [r.getMessage() for r in caplog.records if "could not be taken" in r.getMessage()]
    assert lines == ["request fails-late: its token could not be taken; it fails, the batch goes on"]
    assert f'flamingo_requests_total{{endpoint="{path}",status="200"}} 1' in counted
    assert f'flamingo_stream_errors_total{{endpoint="{path}"}} 1' in counted


def test_a_batch_lines_output_names_the_request_id_its_log_lines_use(model_dir, monkeypatch, caplog):
    import asyncio

    from flamingo.serve.app import create_app
    from flamingo.serve.batch_lines import app_client, entry, parse_lines, send_all

    engine = engine_for(model_dir)
    monkeypatch.setattr(engine, "submit_all", lambda *a, **k: 1 / 0)
    lines = parse_lines([json.dumps({"custom_id": f"q-{k}", "url": "/v1/completions",
                                     "body": {"prompt": "a", "max_tokens": 1}}) for k in range(2)])

    async def run() -> list:
        async with app_client(create_app(engine, ServeSettings(model_name="tiny")), None) as client:
            return await send_all(client, lines, 2)

    with caplog.at_level(logging.ERROR):
        answers = asyncio.run(run())
    ids = [entry(line, answer)["response"]["request_id"] for line, answer in zip(lines, answers)]
    assert all(GENERATED.fullmatch(i) for i in ids) and len(set(ids)) == 2
    assert sorted(r.getMessage() for r in caplog.records if r.exc_info) == \
        sorted(f"request {i}: internal error" for i in ids)
