"""`flamingo batch` (docs/serve.md, "Batch files"): OpenAI Batch API requests answered offline through the server's
endpoints: the answers a running server gives the same bodies, in input order, refusals with their status and
error body, lines that are no request with an error; the CLI prints counts and writes the file."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from flamingo.cli import main
from flamingo.serve.app import ServeSettings
from flamingo.serve.batch import run_batch
from flamingo.tiny import random_image

from serve_helpers import SHOT, data_url, engine_for, fail_sends_of, running_server, save_tiny_model


def _chat(image, question, max_tokens=6):
    return {"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": question}]}]}


def test_a_batch_file_gets_the_servers_answers_in_order(tmp_path, one_thread):
    model_dir = save_tiny_model(tmp_path / "tiny")
    images = [data_url(random_image(k)) for k in range(3)]
    bodies = [_chat(images[0], "Question: what is in the image? Short answer:"),
              {"model": "tiny", "prompt": SHOT + "<image>Question: and here? Short answer:", "max_tokens": 5,
               "temperature": 0, "media": [images[1], images[2]]},
              _chat(images[2], "Output:", max_tokens=4)]
    lines = [json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": bodies[0]}),
             "not json",
             json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": bodies[1]}),
             json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}),
             json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
                         "body": _chat("data:image/png;base64,AAAA", "broken")}),
             json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": bodies[0]}),
             json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions",
                         "body": {**bodies[2], "stream": True}}),
             json.dumps({"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": bodies[2]})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    settings = ServeSettings(model_name="tiny")
    report = run_batch(engine_for(model_dir, max_batch=4), settings, str(tmp_path / "in.jsonl"),
                       str(tmp_path / "out.jsonl"), progress=False)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["a", None, "b", "c", "d", "a", "e", "f"]
    ids = [o["id"] for o in out]  # random and unique, as OpenAI's
    assert all(re.fullmatch("batch_req_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == 8
    assert [o["error"]["code"] if o["error"] else None for o in out] == \
        [None, "invalid_json", None, "invalid_url", None, "duplicate_custom_id", "invalid_request", None]
    assert [o["response"]["status_code"] if o["response"] else None for o in out] == \
        [200, None, 200, None, 400, None, None, 200]
    assert out[4]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert (report.requests, report.succeeded, report.failed, report.invalid) == (8, 3, {400: 1}, 4)
    with running_server(engine_for(model_dir, max_batch=4), settings) as url:  # the same bodies, one by one
        served = [httpx.post(url + path, json=body, timeout=60).json()
                  for path, body in zip(["/v1/chat/completions", "/v1/completions", "/v1/chat/completions"], bodies)]
    batched = [out[0], out[2], out[7]]
    assert [b["response"]["body"]["choices"] for b in batched] == [s["choices"] for s in served]
    assert [b["response"]["body"]["usage"] for b in batched] == [s["usage"] for s in served]
    assert report.completion_tokens == sum(s["usage"]["completion_tokens"] for s in served) > 0


def test_batch_command_prints_counts_and_refuses_a_missing_input(tmp_path, capsys, one_thread):
    model_dir = save_tiny_model(tmp_path / "tiny")
    request = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
               "body": _chat(data_url(random_image(1)), "Output:", max_tokens=3)}
    (tmp_path / "in.jsonl").write_text(json.dumps(request) + "\n")
    args = ["batch", "--model", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out" / "res.jsonl"), "--no-progress", "--max-batch", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads(next(line for line in printed if line.startswith("{")))
    assert (summary["requests"], summary["succeeded"], summary["invalid"]) == (1, 1, 0)
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "res.jsonl").read_text().splitlines()]
    assert entry["response"]["status_code"] == 200 and entry["response"]["body"]["object"] == "chat.completion"
    assert main(["batch", "--model", str(model_dir), "--input", str(tmp_path / "none.jsonl"), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "no input file" in capsys.readouterr().err


def test_a_line_that_is_not_utf8_is_answered_and_the_rest_too(tmp_path, one_thread):
    """A stray byte that is not UTF-8 (a Latin-1 `é` in one prompt) costs that line its character, as the HTTP Batch
    API reads a file, never the whole run (before: a UnicodeDecodeError and no output file)."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                         "body": {"model": "tiny", "prompt": f"caf{cid} and", "max_tokens": 2, "temperature": 0}})
             for cid in ("a", "b")]
    (tmp_path / "in.jsonl").write_bytes(lines[0].encode().replace(b"cafa", b"caf\xe9") + b"\n" + lines[1].encode())
    report = run_batch(engine_for(model_dir, max_batch=2), ServeSettings(model_name="tiny"), str(tmp_path / "in.jsonl"),
                       str(tmp_path / "out.jsonl"), progress=False)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b"]
    assert [o["response"]["status_code"] for o in out] == [200, 200] and report.succeeded == 2


def test_odd_lines_cost_only_themselves(tmp_path, one_thread):
    """A BOM costs no line; a line nested too deeply for the JSON reader (a RecursionError that ended the run with no
    output) and one without a custom_id are error entries naming their line; NaN and half a character (which the
    client sending the lines raised on) get the endpoint's 400; a concurrency under 1 is refused before the run."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    chat = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "Output:"}]}

    def line(cid, body):
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})

    deep = '{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": {"x": ' + "[" * 5000 \
        + "]" * 5000 + "}}"
    no_id = json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": chat})
    lines = ["\ufeff" + line("a", chat), deep, "", no_id, line("nan", {**chat, "temperature": float("nan")}),
             line("half", {**chat, "user": "\ud800"}), line("z", chat)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    engine = engine_for(model_dir, max_batch=2)
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        run_batch(engine, ServeSettings(), str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), concurrency=-1)
    assert engine._thread is None  # refused before the engine started
    report = run_batch(engine, ServeSettings(model_name="tiny"), str(tmp_path / "in.jsonl"),
                       str(tmp_path / "out.jsonl"), progress=False)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["a", None, None, "nan", "half", "z"]
    with pytest.raises(ValueError, match="the engine was stopped"):  # (every line was answered 503, written as if
        # answered)
        run_batch(engine, ServeSettings(), str(tmp_path / "in.jsonl"), str(tmp_path / "again.jsonl"))
    assert not (tmp_path / "again.jsonl").exists()
    assert [o["error"]["message"].split(":")[0] for o in out[1:3]] == ["line 2", "line 4"]
    assert "nested too deeply" in out[1]["error"]["message"]
    assert [o["response"]["status_code"] for o in out[:1] + out[3:]] == [200, 400, 400, 200]
    assert (report.requests, report.succeeded, report.failed, report.invalid) == (6, 2, {400: 2}, 2)


def test_a_line_answered_500_costs_only_itself(tmp_path, one_thread, monkeypatch):
    """An internal error in one line's request (the app answers 500, then re-raises for the server's log) is that
    line's entry with status 500; every line is written (before: the run died with a traceback and no output)."""
    from flamingo.serve import app as app_module

    render = app_module.render_messages

    def render_or_fail(template, messages, control):
        if "BOOM-LINE" in repr(messages):
            raise RuntimeError("a bug in one request")
        return render(template, messages, control)

    monkeypatch.setattr(app_module, "render_messages", render_or_fail)
    model_dir = save_tiny_model(tmp_path / "tiny")
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}})
             for cid, text in (("a", "Output:"), ("boom", "BOOM-LINE"), ("b", "Output:"))]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    report = run_batch(engine_for(model_dir, max_batch=2), ServeSettings(model_name="tiny"), str(tmp_path / "in.jsonl"),
                       str(tmp_path / "out.jsonl"), progress=False)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(o["custom_id"], o["response"]["status_code"]) for o in out] == [("a", 200), ("boom", 500), ("b", 200)]
    assert out[1]["response"]["body"]["error"]["message"] == "internal error: RuntimeError"
    assert (report.succeeded, report.failed) == (2, {500: 1})


def test_a_line_that_fails_to_send_is_logged_with_the_input_file_and_custom_id(tmp_path, one_thread, monkeypatch,
                                                                              caplog):
    """`flamingo batch`'s log line of a line whose request raises in the client names the input file and the line's
    custom_id (as the Batch API's names the batch id), so a reader can find the line."""
    fail_sends_of(monkeypatch, "SEND-FAILS")
    model_dir = save_tiny_model(tmp_path / "tiny")
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}})
             for cid, text in (("a", "Output:"), ("gone", "SEND-FAILS"))]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    report = run_batch(engine_for(model_dir, max_batch=2), ServeSettings(model_name="tiny"), str(tmp_path / "in.jsonl"),
                       str(tmp_path / "out.jsonl"), progress=False)
    assert (report.succeeded, report.failed) == (1, {500: 1})
    (record,) = [r for r in caplog.records if "failed to send" in r.getMessage()]
    assert f"batch {str(tmp_path / 'in.jsonl')!r}, line custom_id 'gone'" in record.getMessage()
