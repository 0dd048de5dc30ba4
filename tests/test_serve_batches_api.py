"""OpenAI's Files and Batch APIs on `flamingo serve --batch-dir` (docs/serve.md, "Batch API over HTTP"), driven by
the official client: upload -> create -> poll -> download gives the answers `/v1/chat/completions` gives the same
bodies, refused lines in the error file; validation fails a batch as OpenAI does (`errors.data` with line numbers);
cancel keeps the partial output; lists paginate; bad calls are 4xx; the key is needed and passed on; a batch left
in progress runs again when a server starts on the same directory; a batch runs one model; files expire when asked
(`expires_after`, `output_expires_after`); output entries have random unique ids."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from flamingo.serve import batch_lines, batch_runner, batch_store
from flamingo.serve.app import ServeSettings, create_app
from flamingo.serve.batch_runner import COMPLETION_WINDOWS
from flamingo.serve.batches import attachment
from flamingo.tiny import random_image

from serve_helpers import data_url, engine_for, fail_sends_of, openai_client, running_server, save_tiny_model

KEY = "batch-key"
DONE = ("completed", "failed", "cancelled", "expired")
HOUR = {"anchor": "created_at", "seconds": 3600}  # OpenAI's shortest file lifetime


def _chat(k: int, question: str = "Output:", max_tokens: int = 5) -> dict:
    return {"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url",
                                                       "image_url": {"url": data_url(random_image(k))}},
                                                      {"type": "text", "text": question}]}]}


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _upload(client, lines: list[str], name: str = "requests.jsonl"):
    return client.files.create(file=(name, _jsonl(lines), "application/jsonl"), purpose="batch")


def _wait(client, batch_id: str, until=DONE, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}"
        time.sleep(0.02)


def _entries(client, file_id) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _on_disk(batch_dir, file_id: str) -> list[str]:
    """The parts of a file (object, content) its store holds on disk."""
    return [ext for ext in (".json", ".data") if (batch_dir / "files" / (file_id + ext)).exists()]


def _clock_ahead(monkeypatch, seconds: float) -> None:
    """Move the clock file expiry reads `seconds` ahead (instead of waiting for it)."""
    monkeypatch.setattr(batch_store, "clock", lambda: time.time() + seconds)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    return save_tiny_model(tmp_path_factory.mktemp("serve_batches") / "model")


@contextlib.contextmanager
def _serving(model_dir, batch_dir, start_engine: bool = True, **settings):
    settings = ServeSettings(model_name="tiny", batch_dir=str(batch_dir), **settings)
    with running_server(engine_for(model_dir, max_batch=4, prefill_chunk=32), settings,
                        start_engine=start_engine) as url:
        yield url


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batches")


@pytest.fixture(scope="module")
def served(model_dir, served_dir):
    # the Host names `flamingo serve` on loopback answers (its batch lines go through the app too)
    with _serving(model_dir, served_dir, batch_concurrency=2, max_batch_file_bytes=256 * 1024,
                  allowed_hosts=("localhost", "127.0.0.1", "::1")) as url:
        yield url


def test_a_batch_answers_as_the_endpoint_and_splits_refusals_into_the_error_file(served, tmp_path):
    client = openai_client(served)
    bodies = [_chat(1, "Question: what is in the image? Short answer:"), _chat(2), _chat(3, max_tokens=3)]
    lines = [_line("a", bodies[0]), "not json", _line("b", bodies[1]),
             _line("c", {**_chat(4), "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
             "", _line("a", bodies[2]), _line("d", bodies[2])]
    (tmp_path / "requests.jsonl").write_bytes(_jsonl(lines))
    with open(tmp_path / "requests.jsonl", "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.purpose == "batch"
    assert uploaded.bytes == len(_jsonl(lines)) and uploaded.filename == "requests.jsonl"
    assert client.files.content(uploaded.id).content == _jsonl(lines)

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"run": "one"})
    assert created.id.startswith("batch_") and created.object == "batch" and created.status == "validating"
    batch = _wait(client, created.id)
    assert batch.status == "completed" and batch.metadata == {"run": "one"} and batch.errors is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 3, 3)

    out = _entries(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["a", "b", "d"]
    served_directly = [httpx.post(served + "/v1/chat/completions", json=b, timeout=60).json() for b in bodies]
    assert [o["response"]["body"]["choices"] for o in out] == [s["choices"] for s in served_directly]
    counted = ("prompt_tokens", "completion_tokens")  # cached_tokens differ: the batch filled the prefix cache
    assert [[o["response"]["body"]["usage"][k] for k in counted] for o in out] == \
        [[s["usage"][k] for k in counted] for s in served_directly]
    assert batch.usage.output_tokens == sum(s["usage"]["completion_tokens"] for s in served_directly) > 0

    errors = _entries(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == [None, "c", "a"]
    assert [e["error"]["code"] if e["error"] else None for e in errors] == ["invalid_json", None,
                                                                           "duplicate_custom_id"]
    assert errors[1]["response"]["status_code"] == 400
    ids = [e["id"] for e in out + errors]  # OpenAI's: random and unique; custom_id joins an entry to its line
    assert all(re.fullmatch("batch_req_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == len(ids)
    for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "error")):
        stored = client.files.retrieve(file_id)
        assert stored.purpose == "batch_output" and stored.filename == f"{batch.id}_{kind}.jsonl"


def test_validation_fails_a_batch_with_the_lines_at_fault(served):
    client = openai_client(served)
    chat = _chat(1)
    lines = [_line("a", chat), _line("b", {**chat, "prompt": "x"}, url="/v1/completions"), "not json",
             _line("c", chat, url="/v1/embeddings")]
    batch = client.batches.create(input_file_id=_upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = _wait(client, batch.id)
    assert batch.status == "failed" and batch.failed_at is not None and batch.output_file_id is None
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [("url_mismatch", 2, "url"),
                                                                      ("url_mismatch", 4, "url")]
    empty = client.batches.create(input_file_id=_upload(client, [""]).id, endpoint="/v1/completions",
                                  completion_window="24h")
    assert [e.code for e in _wait(client, empty.id).errors.data] == ["empty_file"]
    many = client.batches.create(input_file_id=_upload(client, ["{}"] * 50_001).id, endpoint="/v1/completions",
                                 completion_window="24h")
    assert [e.code for e in _wait(client, many.id).errors.data] == ["too_many_tasks"]


def test_a_batch_runs_one_model(served):
    """OpenAI's rule: the lines of a batch name one model. A line naming another model than the first line that
    names one is a `model_mismatch` (its line, `param` body.model) and fails the batch, as a `url_mismatch` does;
    lines that name no model run (the endpoints take requests without one)."""
    client = openai_client(served)
    chat = _chat(1, max_tokens=1)
    unnamed = {k: v for k, v in chat.items() if k != "model"}
    lines = [_line("a", unnamed), _line("b", chat), _line("c", {**chat, "model": "other"}), _line("d", chat),
             _line("e", {**chat, "model": "other"}, url="/v1/completions")]
    batch = _wait(client, client.batches.create(input_file_id=_upload(client, lines).id,
                                                endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.output_file_id is None and batch.in_progress_at is None
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [
        ("model_mismatch", 3, "body.model"), ("url_mismatch", 5, "url"), ("model_mismatch", 5, "body.model")]
    assert "'tiny', the model of line 2" in batch.errors.data[0].message
    one = _wait(client, client.batches.create(input_file_id=_upload(client, [lines[0], lines[1], lines[3]]).id,
                                              endpoint="/v1/chat/completions", completion_window="24h").id)
    assert (one.status, one.request_counts.completed) == ("completed", 3)


def test_files_expire_when_asked_and_are_gone_from_then_on(served, served_dir, monkeypatch):
    """OpenAI's `files.create(expires_after=...)` and `batches.create(output_expires_after=...)`: a file's
    `expires_at` is its `created_at` + seconds; from then on (the clock moved ahead rather than waited for) the
    first call finds it 404 on retrieve and content, absent from lists, and gone from the disk. Files asked no
    expiry stay; the batch keeps the ids of its expired files, as OpenAI's does."""
    client = openai_client(served)
    lines = [_line("a", _chat(1, max_tokens=1)), "not json"]
    kept = _upload(client, lines)
    short = client.files.create(file=("short.jsonl", _jsonl(lines), "application/jsonl"), purpose="batch",
                                expires_after=HOUR)
    assert kept.expires_at is None and short.expires_at == short.created_at + 3600
    assert client.files.retrieve(short.id).expires_at == short.expires_at
    batch = _wait(client, client.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions",
                                                completion_window="24h",
                                                output_expires_after={**HOUR, "seconds": 7200}).id)
    assert batch.status == "completed" and batch.output_file_id and batch.error_file_id
    outputs = [client.files.retrieve(batch.output_file_id), client.files.retrieve(batch.error_file_id)]
    assert [f.expires_at - f.created_at for f in outputs] == [7200, 7200]

    def gone(file_id: str) -> None:
        for call in (client.files.retrieve, client.files.content):
            with pytest.raises(openai.NotFoundError):
                call(file_id)
        assert file_id not in [f.id for f in client.files.list()]
        assert _on_disk(served_dir, file_id) == []

    _clock_ahead(monkeypatch, 3600)
    gone(short.id)
    assert _entries(client, batch.output_file_id)[0]["custom_id"] == "a"  # 7200 s: still there
    _clock_ahead(monkeypatch, 7200)
    for f in outputs:
        gone(f.id)
    assert client.files.retrieve(kept.id).id == kept.id and _on_disk(served_dir, kept.id) == [".json", ".data"]
    assert client.batches.retrieve(batch.id).output_file_id == outputs[0].id


def test_the_sweep_deletes_expired_files_nobody_asks_for(model_dir, tmp_path, monkeypatch):
    """Besides each call, the runner's sweep (every FILE_SWEEP_SECONDS, cut here from 60 s) deletes expired files
    from the disk: no call is needed."""
    monkeypatch.setattr(batch_runner, "FILE_SWEEP_SECONDS", 0.02)
    with _serving(model_dir, tmp_path / "batches") as url:
        short = openai_client(url).files.create(file=("s.jsonl", b"{}\n", "application/jsonl"), purpose="batch",
                                                expires_after=HOUR)
        time.sleep(0.1)  # sweeps pass; the file lives on
        assert _on_disk(tmp_path / "batches", short.id) == [".json", ".data"]
        _clock_ahead(monkeypatch, 3600)
        deadline = time.monotonic() + 10
        while _on_disk(tmp_path / "batches", short.id):
            assert time.monotonic() < deadline, "the sweep left an expired file on disk"
            time.sleep(0.02)


def test_expiry_policies_outside_openais_range_are_400(served):
    """`expires_after` and `output_expires_after` take anchor `created_at` and 3600 to 2592000 seconds (OpenAI's);
    anything else is a 400 naming the part at fault, including what the client cannot send (a part missing, a
    number that is no integer, another field)."""
    client = openai_client(served)
    good = _upload(client, [_line("a", _chat(1, max_tokens=1))])
    create = dict(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h")
    bad = {"anchor": {"anchor": "last_active_at", "seconds": 3600}, "seconds": {**HOUR, "seconds": 3599},
           "seconds ": {**HOUR, "seconds": 2592001}}
    for part, policy in bad.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.files.create(file=("x.jsonl", b"{}\n", "application/jsonl"), purpose="batch", expires_after=policy)
        assert e.value.body["param"] == "expires_after." + part.strip()
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(**create, output_expires_after=policy)
        assert e.value.body["param"] == "output_expires_after." + part.strip()
    forms = [({"expires_after[anchor]": "created_at"}, "expires_after.seconds"),
             ({"expires_after[seconds]": "3600"}, "expires_after.anchor"),
             ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1h"}, "expires_after.seconds"),
             ({"expires_after[days]": "1"}, "expires_after[days]")]
    for fields, param in forms:
        raw = httpx.post(served + "/v1/files", data={"purpose": "batch", **fields},
                         files={"file": ("x.jsonl", b"{}\n")})
        assert raw.status_code == 400 and raw.json()["error"]["param"] == param, fields
    for policy in ({"anchor": "created_at"}, {**HOUR, "seconds": "3600"}, {**HOUR, "seconds": 3600.0}):
        raw = httpx.post(served + "/v1/batches", json={**create, "output_expires_after": policy})
        assert raw.status_code == 400 and raw.json()["error"]["param"] == "output_expires_after.seconds", policy
    for seconds in (3600, 2592000):  # both ends are taken
        f = client.files.create(file=("x.jsonl", b"{}\n", "application/jsonl"), purpose="batch",
                                expires_after={**HOUR, "seconds": seconds})
        assert f.expires_at == f.created_at + seconds
        batch = client.batches.create(**create, output_expires_after={**HOUR, "seconds": seconds})
        assert _wait(client, batch.id).status == "completed"


def test_bad_calls_are_4xx_and_the_server_keeps_serving(served):
    client = openai_client(served)
    good = _upload(client, [_line("a", _chat(1))])
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n", "application/jsonl"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError, match="max-batch-file-mb") as e:
        client.files.create(file=("big.jsonl", b"x" * 300 * 1024, "application/jsonl"), purpose="batch")
    assert e.value.status_code == 413
    # the limit is the file's, not the multipart body's (a file a few hundred bytes under it was refused)
    assert client.files.create(file=("at.jsonl", b"x" * 256 * 1024, "application/jsonl"), purpose="batch").bytes \
        == 256 * 1024
    with pytest.raises(openai.APIStatusError, match="the file is larger than the server's limit of 262144 bytes"):
        client.files.create(file=("over.jsonl", b"x" * (256 * 1024 + 1), "application/jsonl"), purpose="batch")
    for call in (lambda: client.files.retrieve("file-nope"), lambda: client.files.content("file-nope"),
                 lambda: client.files.delete("file-nope"), lambda: client.batches.retrieve("batch_nope"),
                 lambda: client.batches.cancel("batch_nope"),
                 lambda: client.batches.create(input_file_id="file-nope", endpoint="/v1/completions",
                                               completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    bad = {"endpoint": dict(endpoint="/v1/embeddings"), "completion_window": dict(completion_window="48h"),
           "metadata": dict(metadata={f"k{i}": "v" for i in range(17)}),
           "metadata ": dict(metadata={"k": "v" * 513})}
    for param, change in bad.items():
        kwargs = {"input_file_id": good.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                  **change}
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(**kwargs)
        assert e.value.body["param"] == param.strip()
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.batches.list(limit=0)
    raw = httpx.post(served + "/v1/files", content=b"{}", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "multipart" in raw.json()["error"]["message"]
    done = _wait(client, client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions",
                                               completion_window="24h").id)
    assert done.status == "completed"
    sent = []  # a final answer is not retried by a client that retries (the SDKs retry a 409 unless told not to)
    retrying = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=2, http_client=httpx.Client(
        event_hooks={"request": [sent.append]}))
    with pytest.raises(openai.ConflictError) as e:
        retrying.batches.cancel(done.id)
    assert e.value.response.headers["x-should-retry"] == "false" and len(sent) == 1
    for response in (raw, httpx.get(served + "/v1/files/file-nope"), httpx.get(served + "/v1/batches/x/cancel"),
                     httpx.post(served + "/v1/files", content=b"x", headers={"content-type": "multipart/form-data",
                                                                             "content-encoding": "br"})):
        assert response.status_code in (400, 404, 405, 415) and response.headers["x-should-retry"] == "false"
    assert client.files.delete(good.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(good.id)


def test_an_upload_with_a_content_encoding_is_415_and_stores_nothing(served):
    """As every other body: a gzip upload, or a plain one labelled gzip, is the documented 415, not a multipart
    error or a file stored as sent."""
    client = openai_client(served)
    before = {f.id for f in client.files.list()}
    request = httpx.Request("POST", served + "/v1/files", data={"purpose": "batch"},
                            files={"file": ("r.jsonl", _jsonl([_line("a", _chat(1))]))})
    body = request.read()
    for sent in (gzip.compress(body), body):
        raw = httpx.post(served + "/v1/files", content=sent,
                         headers={"content-type": request.headers["content-type"], "content-encoding": "gzip"})
        assert raw.status_code == 415 and raw.json()["error"]["code"] == "unsupported_content_encoding", raw.text
    assert {f.id for f in client.files.list()} == before


def test_cancel_stops_a_running_batch_and_keeps_its_partial_output(served):
    client = openai_client(served)
    lines = [_line(f"q{k}", {"messages": [{"role": "user", "content": f"Count {k}:"}], "max_tokens": 8,
                             "temperature": 0}) for k in range(300)]
    running = client.batches.create(input_file_id=_upload(client, lines).id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    queued = client.batches.create(input_file_id=_upload(client, lines[:2]).id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(running.id)).request_counts.completed < 2:
        assert batch.status in ("validating", "in_progress") and time.monotonic() < deadline
        time.sleep(0.01)
    assert client.batches.cancel(queued.id).status == "cancelled"  # not started: cancelled at once
    assert client.batches.cancel(running.id).status == "cancelling"
    batch = _wait(client, running.id)
    assert batch.status == "cancelled" and batch.cancelling_at <= batch.cancelled_at
    counts = batch.request_counts
    assert counts.total == 300 and 2 <= counts.completed < 300 and counts.failed == 0
    out = _entries(client, batch.output_file_id)
    assert len(out) == counts.completed and batch.error_file_id is None
    assert all(o["response"]["status_code"] == 200 for o in out)
    queued = client.batches.retrieve(queued.id)
    assert queued.status == "cancelled" and queued.output_file_id is None and queued.request_counts.total == 0


def test_a_batch_past_its_window_expires_with_its_answers_kept(served, monkeypatch):
    """OpenAI's expiry, with the window cut from 24 h to 1 s (and then to 0): the lines answered by then keep their
    answers, the others go to the error file as `batch_expired`; a batch whose window passed before it ran has all
    its lines so."""
    client = openai_client(served)
    lines = [_line(f"q{k}", {"messages": [{"role": "user", "content": f"Count {k}:"}], "max_tokens": 8,
                             "temperature": 0}) for k in range(300)]
    monkeypatch.setitem(COMPLETION_WINDOWS, "24h", 1)
    created = client.batches.create(input_file_id=_upload(client, lines).id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    assert created.expires_at == created.created_at + 1
    batch = _wait(client, created.id)
    assert batch.status == "expired" and batch.expired_at >= batch.created_at
    counts = batch.request_counts
    assert counts.total == 300 and counts.completed < 300 and counts.completed + counts.failed == 300
    errors = _entries(client, batch.error_file_id)
    assert len(errors) == counts.failed and {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
    out = _entries(client, batch.output_file_id) if batch.output_file_id else []
    assert len(out) == counts.completed and all(o["response"]["status_code"] == 200 for o in out)
    assert sorted(o["custom_id"] for o in out + errors) == sorted(f"q{k}" for k in range(300))

    monkeypatch.setitem(COMPLETION_WINDOWS, "24h", 0)
    late = _wait(client, client.batches.create(input_file_id=_upload(client, lines[:3]).id,
                                               endpoint="/v1/chat/completions", completion_window="24h").id)
    assert late.status == "expired" and late.output_file_id is None and late.in_progress_at is None
    assert (late.request_counts.completed, late.request_counts.failed) == (0, 3)
    assert [e["custom_id"] for e in _entries(client, late.error_file_id)] == ["q0", "q1", "q2"]


def test_lists_page_newest_first(model_dir, tmp_path):
    with _serving(model_dir, tmp_path / "batches") as url:
        client = openai_client(url)
        files = [_upload(client, [_line("a", _chat(1, max_tokens=1))], name=f"f{k}.jsonl") for k in range(5)]
        first = client.files.list(limit=2)
        assert [f.id for f in first.data] == [files[4].id, files[3].id] and first.has_more
        assert [f.id for f in client.files.list(limit=2, after=files[3].id).data] == [files[2].id, files[1].id]
        assert [f.id for f in client.files.list(limit=2)] == [f.id for f in reversed(files)]  # the SDK pages on
        assert [f.id for f in client.files.list(order="asc")] == [f.id for f in files]
        batches = [client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                         completion_window="24h") for f in files[:3]]
        assert [b.id for b in client.batches.list(limit=1)] == [b.id for b in reversed(batches)]
        last = client.batches.list(limit=2, after=batches[1].id)
        assert [b.id for b in last.data] == [batches[0].id] and not last.has_more
        for b in batches:
            assert _wait(client, b.id).status == "completed"  # in creation order, one at a time
        assert len(client.files.list(purpose="batch_output").data) == 3


def test_a_list_pages_on_past_a_file_deleted_or_expired(model_dir, tmp_path, monkeypatch):
    """The SDK's pager asks for the page after the last id it saw: a loop that deletes each file it lists, or a file
    that expires between two pages, leaves that id gone, and the list goes on from its place, after a restart too;
    an id never seen is still a 400."""
    with _serving(model_dir, tmp_path / "batches") as url:
        client = openai_client(url)
        files = [_upload(client, [_line("a", _chat(1, max_tokens=1))], name=f"f{k}.jsonl") for k in range(5)]
        deleted = []
        for f in client.files.list(purpose="batch", limit=2):
            client.files.delete(f.id)
            deleted.append(f.id)
        assert deleted == [f.id for f in reversed(files)]
        files = [_upload(client, [_line("a", _chat(1, max_tokens=1))], name=f"g{k}.jsonl") for k in range(2)]
        expiring = client.files.create(file=("e.jsonl", _jsonl([_line("a", _chat(1))]), "application/jsonl"),
                                       purpose="batch", expires_after=HOUR)
        files.append(_upload(client, [_line("a", _chat(1, max_tokens=1))], name="g2.jsonl"))
        _clock_ahead(monkeypatch, 3601)
        assert [f.id for f in client.files.list(order="asc", after=expiring.id).data] == [files[2].id]
        assert [f.id for f in client.files.list(after=expiring.id).data] == [files[1].id, files[0].id]
        with pytest.raises(openai.BadRequestError) as e:
            client.files.list(after="file-" + "0" * 24)
        assert e.value.body["param"] == "after"
    with _serving(model_dir, tmp_path / "batches") as url:  # a restart: the places are kept on disk
        client = openai_client(url)
        assert [f.id for f in client.files.list(order="asc", after=deleted[0]).data] == [f.id for f in files]
        assert [f.id for f in client.files.list(after=expiring.id).data] == [files[1].id, files[0].id]


def test_the_key_guards_the_routes_and_the_batch_passes_it_on(model_dir, tmp_path):
    with _serving(model_dir, tmp_path / "batches", api_key=KEY) as url:
        with pytest.raises(openai.AuthenticationError):
            openai_client(url).files.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        batch = client.batches.create(input_file_id=_upload(client, [_line("a", _chat(1))]).id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        batch = _wait(client, batch.id)
        assert (batch.status, batch.request_counts.completed) == ("completed", 1)
        assert _entries(client, batch.output_file_id)[0]["response"]["status_code"] == 200


def test_a_server_without_a_batch_dir_says_so(model_dir):
    app = create_app(engine_for(model_dir), ServeSettings(model_name="tiny"))

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
            return await c.get("/v1/batches")

    answer = asyncio.run(get())
    assert answer.status_code == 404 and "--batch-dir" in answer.json()["error"]["message"]


def test_a_batch_in_progress_when_the_server_stops_runs_again_on_restart(model_dir, tmp_path):
    batch_dir = tmp_path / "batches"
    bodies = [_chat(1), _chat(2, max_tokens=3)]
    with _serving(model_dir, batch_dir, start_engine=False) as url:  # the engine never runs the lines
        client = openai_client(url)
        batch = client.batches.create(input_file_id=_upload(client, [_line("a", bodies[0]), _line("b", bodies[1])]).id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        _wait(client, batch.id, until=("in_progress",))
    on_disk = json.loads((batch_dir / "batches" / f"{batch.id}.json").read_text())
    assert on_disk["body"]["status"] == "in_progress"
    with _serving(model_dir, batch_dir) as url:
        client = openai_client(url)
        batch = _wait(client, batch.id)
        assert (batch.status, batch.request_counts.completed, batch.request_counts.total) == ("completed", 2, 2)
        direct = [httpx.post(url + "/v1/chat/completions", json=b, timeout=60).json()["choices"] for b in bodies]
        assert [o["response"]["body"]["choices"] for o in _entries(client, batch.output_file_id)] == direct


def test_a_draining_server_leaves_its_batch_to_the_next_start(model_dir, tmp_path):
    """On SIGTERM the engine refuses new requests (503): those refusals are no answers, so the batch is not
    finalized with them, its lines stop being sent and its counts stop (a client polling it saw `failed` climb); it
    stays in progress and the next server answers every line."""
    batch_dir = tmp_path / "batches"
    lines = [_line(f"q{k}", {"messages": [{"role": "user", "content": f"Count {k}:"}], "max_tokens": 4,
                             "temperature": 0}) for k in range(40)]
    engine = engine_for(model_dir, max_batch=4, prefill_chunk=32)
    settings = ServeSettings(model_name="tiny", batch_dir=str(batch_dir), batch_concurrency=1)
    with running_server(engine, settings) as url:
        client = openai_client(url)
        batch = client.batches.create(input_file_id=_upload(client, lines).id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.drain()
        time.sleep(1.0)  # the line in flight (concurrency 1) is answered; no other is sent
        counts = client.batches.retrieve(batch.id).request_counts
        time.sleep(0.5)
        left = client.batches.retrieve(batch.id)
        assert left.status == "in_progress" and left.output_file_id is None
        assert left.request_counts == counts and counts.failed == 0 and counts.completed < 40, counts
    with _serving(model_dir, batch_dir) as url:
        batch = _wait(openai_client(url), batch.id)
        assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 40, 0)


def test_serve_options_reach_the_settings():
    from flamingo.cli import build_parser
    from flamingo.serve.server import settings_for

    args = build_parser().parse_args(["serve", "--model", "m", "--batch-dir", "d", "--batch-concurrency", "3",
                                      "--max-batch-file-mb", "0.5"])
    settings = settings_for(args.model, batch_dir=args.batch_dir, batch_concurrency=args.batch_concurrency,
                            max_batch_file_mb=args.max_batch_file_mb)
    assert (settings.batch_dir, settings.batch_concurrency, settings.max_batch_file_bytes) == ("d", 3, 512 * 1024)
    assert build_parser().parse_args(["batch", "--model", "m", "--input", "i", "--output", "o"]).batch_dir is None


def test_a_file_whose_content_goes_between_checks_is_404_and_fails_a_batch(served, served_dir):
    """A file's content removed under its object (what an expiry racing a call leaves for a moment): its content is a
    404 (not a 500), and a batch reading it fails with `file_not_found`."""
    client = openai_client(served)
    uploaded = _upload(client, [_line("a", _chat(1))])
    (served_dir / "files" / f"{uploaded.id}.data").unlink()
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)
    done = _wait(client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                               completion_window="24h").id)
    assert done.status == "failed" and done.errors.data[0].code == "file_not_found"
    assert client.models.list().data  # and the server keeps serving


def test_an_input_file_is_split_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028 (or U+0085) raw: the line it is on stays one request."""
    request = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": "one\u2028two\x85three", "max_tokens": 1}}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(request, ensure_ascii=False) + "\n" + json.dumps({**request, "custom_id": "b"}) + "\n",
                    encoding="utf-8")
    lines = [line for line in batch_lines.read_lines(str(path)) if line.strip()]
    assert [json.loads(line)["custom_id"] for line in lines] == ["a", "b"]
    for encoding in ("utf-16", "utf-32"):  # with their byte-order mark: Notepad's "Unicode" (each line was not JSON)
        path.write_text("\n".join(json.dumps({**request, "custom_id": k}) for k in "abc") + "\n", encoding=encoding)
        lines = [line for line in batch_lines.read_lines(str(path)) if line.strip()]
        assert [json.loads(line)["custom_id"] for line in lines] == ["a", "b", "c"]


def _odd_lines(chat: dict) -> list[str]:
    """A UTF-8 BOM before a good first line (Windows editors write one), then lines that are no request or that the
    endpoint refuses, and one good line after them."""
    deep = '{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": {"x": ' + "[" * 5000 \
        + "]" * 5000 + "}}"
    no_id = json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": chat})
    return ["\ufeff" + _line("a", chat), deep, "not json", no_id,
            _line("nan", {**chat, "temperature": float("nan")}), _line("half", {**chat, "user": "\ud800"}),
            _line("z", chat)]


def test_odd_lines_cost_only_themselves_and_errors_name_their_line(served):
    """A BOM costs no line; a line nested too deeply for the JSON reader, one that is not JSON and one without a
    custom_id are error entries whose messages name their line; NaN and half a character get the endpoint's 400;
    the batch runs (before: the deep line failed the batch, the BOM cost the first line, NaN and the surrogate
    raised in the client that sends the lines)."""
    client = openai_client(served)
    batch = _wait(client, client.batches.create(input_file_id=_upload(client, _odd_lines(_chat(1, max_tokens=1))).id,
                                                endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 2, 5)
    assert [o["custom_id"] for o in _entries(client, batch.output_file_id)] == ["a", "z"]
    errors = _entries(client, batch.error_file_id)
    assert [e["error"]["message"].split(":")[0] if e["error"] else e["custom_id"] for e in errors] == \
        ["line 2", "line 3", "line 4", "nan", "half"]
    assert "nested too deeply" in errors[0]["error"]["message"] and errors[0]["error"]["code"] == "invalid_json"
    assert [e["response"]["status_code"] for e in errors[3:]] == [400, 400]
    assert "lone UTF-16 surrogate" in errors[4]["response"]["body"]["error"]["message"]


def test_bad_batch_options_are_refused_at_construction(model_dir, tmp_path):
    """A batch concurrency under 1 (a negative one failed every batch; 0 meant the default) and a batch directory
    that is a file (a traceback after the model loaded) are refused when the settings are made."""
    from flamingo.serve.batch_lines import send_all

    for bad in (0, -3):
        with pytest.raises(ValueError, match="concurrency must be >= 1"):
            ServeSettings(batch_concurrency=bad)
    (tmp_path / "file").write_text("")
    for where in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ValueError, match="is a file, not a directory"):
            ServeSettings(batch_dir=str(where))
        with pytest.raises(ValueError, match="is a file, not a directory"):
            batch_store.BatchStore(str(where))
    ServeSettings(batch_dir=str(tmp_path / "new" / "dir"), batch_concurrency=1)  # made when the store opens
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        asyncio.run(send_all(None, [], 0))


def test_a_line_answered_500_is_in_the_error_file_and_the_batch_completes(served, monkeypatch):
    """An internal error in one line's request (the app's catch-all answers 500, then re-raises for the server's
    log) is that line's error entry: before, the in-process client raised it and the whole batch failed with no
    files."""
    from flamingo.serve import app as app_module

    render = app_module.render_messages

    def render_or_fail(template, messages, control):
        if "BOOM-LINE" in repr(messages):  # no base64 image holds a "-"
            raise RuntimeError("a bug in one request")
        return render(template, messages, control)

    monkeypatch.setattr(app_module, "render_messages", render_or_fail)
    client = openai_client(served)
    lines = [_line("a", _chat(1, max_tokens=2)), _line("boom", _chat(2, "BOOM-LINE", max_tokens=2)),
             _line("b", _chat(3, max_tokens=2))]
    batch = _wait(client, client.batches.create(input_file_id=_upload(client, lines).id,
                                                endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 2, 1)
    assert [o["custom_id"] for o in _entries(client, batch.output_file_id)] == ["a", "b"]
    (error,) = _entries(client, batch.error_file_id)
    assert error["custom_id"] == "boom" and error["response"]["status_code"] == 500
    assert error["response"]["body"]["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                                  "param": None, "code": None}


def test_a_line_that_fails_to_send_is_logged_with_its_batch_custom_id_and_request_id(served, monkeypatch,
                                                                                     caplog):
    """A line whose request raises in the client that sends it is its own 500 entry; its log line names the batch,
    the line's custom_id (by repr: a line break in it forges no log line) and the request id its entry holds (before,
    it named none of them, and a reader of the log could not tie it to its batch)."""
    fail_sends_of(monkeypatch, "SEND-FAILS")
    client = openai_client(served)
    lines = [_line("a", _chat(1, max_tokens=1)), _line("odd\nid", _chat(2, "SEND-FAILS", max_tokens=1))]
    batch = _wait(client, client.batches.create(input_file_id=_upload(client, lines).id,
                                                endpoint="/v1/chat/completions", completion_window="24h").id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 1, 1)
    (error,) = _entries(client, batch.error_file_id)
    assert error["response"]["status_code"] == 500
    (record,) = [r for r in caplog.records if "failed to send" in r.getMessage()]
    assert record.getMessage() == (f"request {error['response']['request_id']}: batch {batch.id}, line custom_id "
                                   "'odd\\nid': its request failed to send")
    assert record.exc_info is not None and "\n" not in record.getMessage()


def test_a_line_whose_schema_crashed_llguidance_fails_alone(served):
    """A json_schema line with integer bounds at -2**63 (which crashed the server inside llguidance, and, the batch
    being persisted in progress, every server started on its directory after it) is a 400 in the error file."""
    client = openai_client(served)
    schema = {"type": "integer", "minimum": -(2**63), "maximum": -(2**63)}
    lines = [_line("a", _chat(1, max_tokens=2)),
             _line("crash", {**_chat(2, max_tokens=2), "response_format": {
                 "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})]
    batch = _wait(client, client.batches.create(input_file_id=_upload(client, lines).id,
                                                endpoint="/v1/chat/completions", completion_window="24h").id)
    assert (batch.status, batch.request_counts.completed, batch.request_counts.failed) == ("completed", 1, 1)
    (error,) = _entries(client, batch.error_file_id)
    assert error["custom_id"] == "crash" and error["response"]["status_code"] == 400
    assert "2**53" in error["response"]["body"]["error"]["message"]


def test_a_batch_cancelled_while_validating_ends_cancelled(served, monkeypatch):
    """OpenAI's lifecycle: `cancelling` ends `cancelled`, also for a batch whose file would fail validation (before:
    answered `cancelling`, then ended `failed` with its url_mismatch)."""
    import threading

    reading, release = threading.Event(), threading.Event()

    def slow_read(path):
        reading.set()
        assert release.wait(30)
        return batch_lines.read_lines(path)

    monkeypatch.setattr(batch_runner, "read_lines", slow_read)
    client = openai_client(served)
    lines = [_line("a", _chat(1)), _line("b", {"prompt": "x"}, url="/v1/completions")]
    created = client.batches.create(input_file_id=_upload(client, lines).id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    assert reading.wait(30)
    assert client.batches.cancel(created.id).status == "cancelling"
    release.set()
    batch = _wait(client, created.id)
    assert (batch.status, batch.failed_at, batch.errors) == ("cancelled", None, None)
    assert batch.cancelling_at <= batch.cancelled_at and batch.output_file_id is None and batch.error_file_id is None


def test_a_batch_the_server_died_in_again_and_again_is_failed_not_rerun(model_dir, tmp_path):
    """A run counts on disk until it ends (a clean stop ends it): a batch found active whose last
    MAX_INTERRUPTED_RUNS runs all died with their process (a native crash in one of its lines crashed each server
    started on the directory) is failed with a server_error; one with fewer runs again and completes."""
    batch_dir = tmp_path / "batches"
    with _serving(model_dir, batch_dir, start_engine=False) as url:  # the engine never runs the lines
        client = openai_client(url)
        ids = []
        for k in range(2):
            f = _upload(client, [_line("a", _chat(k, max_tokens=1))])
            ids.append(client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                             completion_window="24h").id)
        _wait(client, ids[0], until=("in_progress",))
    records = [batch_dir / "batches" / f"{i}.json" for i in ids]
    assert [json.loads(r.read_text())["interrupted_runs"] for r in records] == [0, 0]  # stopped cleanly
    for record, runs in zip(records, (batch_runner.MAX_INTERRUPTED_RUNS, batch_runner.MAX_INTERRUPTED_RUNS - 1)):
        saved = json.loads(record.read_text())  # as a server that died in each of those runs left it
        record.write_text(json.dumps({**saved, "body": {**saved["body"], "status": "in_progress"},
                                      "interrupted_runs": runs}))
    with _serving(model_dir, batch_dir) as url:
        client = openai_client(url)
        failed, rerun = _wait(client, ids[0]), _wait(client, ids[1])
        assert failed.status == "failed" and failed.errors.data[0].code == "server_error"
        assert "abnormally" in failed.errors.data[0].message and failed.output_file_id is None
        assert (rerun.status, rerun.request_counts.completed) == ("completed", 1)
    assert json.loads(records[1].read_text())["interrupted_runs"] == 0


def test_the_docs_batch_snippet_runs_on_a_batch_with_no_refused_line(served, tmp_path, monkeypatch):
    """docs/serve.md's "Batch API over HTTP" block, as written (its URL and key aside): it asked for the error file
    of a batch without one (`files.content(None)` raises) and cancelled the finished batch (409)."""
    doc = (Path(__file__).parents[1] / "docs" / "serve.md").read_text()
    block = doc.split("### Batch API over HTTP", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    block = block.replace("http://127.0.0.1:8000/v1", served + "/v1").replace("time.sleep(5)", "time.sleep(0.02)")
    (tmp_path / "requests.jsonl").write_bytes(_jsonl([_line("a", _chat(1)), _line("b", _chat(2))]))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "docs/serve.md", "exec"), scope)
    assert scope["b"].status == "completed" and scope["refused"] == ""
    assert [json.loads(line)["custom_id"] for line in scope["answers"].splitlines()] == ["a", "b"]


def test_a_line_waits_out_a_full_queue_as_long_as_it_takes_until_the_batch_stops(monkeypatch):
    """A 429 (the engine's queue full of interactive requests) is retried until there is room, not given up after
    some number of tries with the 429 as the line's answer: a batch has its whole window. A line still waiting when
    the batch is cancelled or expires was never run (None: the runner files it so)."""
    refusals = {"left": 3000}

    def handler(request: httpx.Request) -> httpx.Response:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            return httpx.Response(429, json={"error": {"message": "queue full"}})
        return httpx.Response(200, json={"ok": True})

    async def no_wait(seconds: float) -> None:
        return None

    monkeypatch.setattr(batch_lines.asyncio, "sleep", no_wait)
    line = {"url": "/v1/chat/completions", "body": {"model": "m", "messages": []}, "request_id": "req_1"}

    async def run(stop: asyncio.Event | None) -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            return await batch_lines._answer(client, line, stop)

    assert asyncio.run(run(None)) == (200, {"ok": True})
    refusals["left"] = 5
    stopped = asyncio.Event()
    stopped.set()
    assert asyncio.run(run(stopped)) is None


def test_a_download_is_named_as_uploaded_in_any_script(served):
    """`filename*` (RFC 6266) carries the UTF-8 name, which `filename="..."` cannot (user agents do not decode a
    percent-encoded one), with a printable-ASCII stand-in beside it; a plain name goes as it is."""
    client = openai_client(served)
    for name, disposition in (("数据 🦩.jsonl", "attachment; filename=\"__ _.jsonl\"; "
                                               "filename*=UTF-8''%E6%95%B0%E6%8D%AE%20%F0%9F%A6%A9.jsonl"),
                              ("plain name.jsonl", 'attachment; filename="plain name.jsonl"')):
        uploaded = client.files.create(file=(name, _jsonl([_line("a", _chat(1))])), purpose="batch")
        assert uploaded.filename == name
        response = httpx.get(f"{served}/v1/files/{uploaded.id}/content", timeout=60)
        assert response.headers["content-disposition"] == disposition
    assert attachment('say "hi".jsonl') == \
        "attachment; filename=\"say _hi_.jsonl\"; filename*=UTF-8''say%20%22hi%22.jsonl"


def test_a_failed_write_of_a_batch_record_leaves_the_worker_running(model_dir, tmp_path, monkeypatch):
    """A moment of full disk as the worker writes a batch's record: logged, the batch runs, and so do the batches
    after it (before: the error ended the worker's task, and every later batch stayed `validating`)."""
    save = batch_store.BatchStore.save_batch
    failed = []

    async def save_once_full(self, record):
        if record.interrupted_runs > 0 and not failed:  # the worker's write as the batch starts
            failed.append(record.body["id"])
            raise OSError(28, "No space left on device")
        await save(self, record)

    monkeypatch.setattr(batch_store.BatchStore, "save_batch", save_once_full)
    with _serving(model_dir, tmp_path / "batches") as url:
        client = openai_client(url)
        for i in range(2):
            batch = client.batches.create(input_file_id=_upload(client, [_line("a", _chat(i, max_tokens=2))]).id,
                                          endpoint="/v1/chat/completions", completion_window="24h")
            assert _wait(client, batch.id, timeout=30).status == "completed"
    assert len(failed) == 1


def test_an_upload_onto_a_full_disk_is_507_and_leaves_no_content(served, served_dir, monkeypatch):
    """The client is told the server's disk is full (a 5xx it may retry), not 'internal error: OSError'."""
    before = sorted(os.listdir(served_dir / "files"))

    def full(self, path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch_store.BatchStore, "_write", full)
    response = httpx.post(f"{served}/v1/files", data={"purpose": "batch"}, timeout=60,
                          files={"file": ("r.jsonl", _jsonl([_line("a", _chat(1))]), "application/jsonl")})
    assert response.status_code == 507 and "disk is full" in response.json()["error"]["message"]
    assert sorted(os.listdir(served_dir / "files")) == before


def test_a_batch_created_onto_a_full_disk_is_507_and_not_listed(served, monkeypatch):
    """The batch's record was listed before it was written: on a full disk the client got a 500, and a batch stayed
    listed as `validating` that never ran."""
    client = openai_client(served)
    file_id = _upload(client, [_line("a", _chat(1, max_tokens=2))]).id
    write = batch_store.BatchStore._write
    before = {b.id for b in client.batches.list()}

    def full(path, text):
        if "batches" in os.path.basename(os.path.dirname(path)):
            raise OSError(28, "No space left on device")
        write(path, text)

    monkeypatch.setattr(batch_store.BatchStore, "_write", staticmethod(full))
    response = httpx.post(f"{served}/v1/batches", timeout=60, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert response.status_code == 507 and "the batch was not created" in response.json()["error"]["message"]
    assert {b.id for b in client.batches.list()} == before
    monkeypatch.undo()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert _wait(client, batch.id).status == "completed"
