"""The OpenAI-compatible API: the official `openai` client's chat and streaming calls, raw completions with media,
local and video media, n / seed / stop / usage, models, health, metrics, a disconnecting client, and SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from flamingo.chat import BLANKS
from flamingo.serve.app import ServeSettings
from flamingo.serve.media import MediaPolicy
from flamingo.tiny import random_image

from helpers import _video
from serve_helpers import data_url, engine_for, free_port, greedy_alone, running_server, save_tiny_model, wait_healthy

QUESTION = "Question: what is in the image? Short answer:"


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("serve_api")
    model_dir = save_tiny_model(root / "model")
    media = root / "media"
    media.mkdir()
    random_image(7).save(media / "seven.png")
    _video(media, "clip.mp4", seed=3, frames=3)
    engine = engine_for(model_dir, max_batch=8, prefill_chunk=16)
    settings = ServeSettings(model_name="tiny", media=MediaPolicy(root=media))
    with running_server(engine, settings) as url:
        yield engine, url, media


def _expected(engine, prompt, media, max_tokens, strip=True):
    tokens = greedy_alone(engine, prompt, media, max_tokens)
    stopped = bool(tokens) and tokens[-1] in engine.eos
    text = engine.processor.decode(tokens[:-1] if stopped else tokens)
    return (text.lstrip(BLANKS) if strip else text), len(tokens), "stop" if stopped else "length"


def _few_shot():
    images = [random_image(1), random_image(2)]
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "a red circle."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[1], "JPEG")}},
                                     {"type": "text", "text": QUESTION}]},
    ]
    prompt = f"<image>{QUESTION} a red circle.<|endofchunk|><image>{QUESTION}"
    return messages, prompt, [random_image(1), _jpeg_roundtrip(images[1])]


def _jpeg_roundtrip(image):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_chat_equals_greedy_generation(served):
    engine, url, _ = served
    messages, prompt, images = _few_shot()
    out = _client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    text, count, reason = _expected(engine, prompt, images, 10)
    assert out.choices[0].message.content == text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == reason
    assert out.usage.completion_tokens == count
    assert out.usage.prompt_tokens == len(engine.processor(prompt, images=images)["input_ids"][0])
    assert out.usage.total_tokens == out.usage.prompt_tokens + count


def test_openai_client_streaming_equals_the_whole_answer(served):
    engine, url, _ = served
    messages, prompt, images = _few_shot()
    stream = _client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expected, count, reason = _expected(engine, prompt, images, 10)
    assert (text, reasons) == (expected, [reason])
    assert chunks[-1].usage.completion_tokens == count
    assert len(chunks) > 3  # streamed in pieces, not in one chunk


def test_raw_completion_with_media_local_file_and_video(served):
    engine, url, media = served
    prompt = "<image>Output: a cat.<|endofchunk|><image>Output:"
    with open(media / "clip.mp4", "rb") as f:
        video = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
    body = {"prompt": prompt, "media": ["seven.png", video], "max_tokens": 8, "temperature": 0}
    out = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    text, count, reason = _expected(engine, prompt, [str(media / "seven.png"), str(media / "clip.mp4")], 8,
                                    strip=False)
    assert out["object"] == "text_completion"
    assert (out["choices"][0]["text"], out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]) == \
        (text, count, reason)
    # the same video as a chat video part, and a file:// URL under the media root
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                             {"type": "text", "text": "Output:"}]}]
    chat = _client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == _expected(engine, "<image>Output:", [str(media / "clip.mp4")], 8)[0]
    messages = [{"role": "user", "content": [{"type": "image_url",
                                              "image_url": {"url": (media / "seven.png").as_uri()}}]}]
    chat = _client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == _expected(engine, "<image>", [str(media / "seven.png")], 4)[0]


def test_n_seed_and_stop(served):
    engine, url, _ = served
    client = _client(url)
    messages, prompt, images = _few_shot()
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    sampled = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=1.5,
                                              top_p=0.9, n=3, seed=11) for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1]  # the seed repeats them
    assert len(set(texts[0])) > 1  # each choice samples its own tokens
    text, _, _ = _expected(engine, prompt, images, 8)
    stop = text[2:4]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stop=[stop])
    assert out.choices[0].message.content == text[:text.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_models_health_metrics_and_page(served):
    engine, url, _ = served
    assert [m.id for m in _client(url).models.list().data] == ["tiny"]
    assert _client(url).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(url).models.retrieve("gpt-4")
    assert httpx.get(url + "/health").json()["status"] == "ok"
    metrics = httpx.get(url + "/metrics").text
    for name in ("requests_total", "generation_tokens_total", "queue_depth", "batch_size_bucket",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_sum"):
        assert f"flamingo_{name}" in metrics
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def _held_open(port: int, seconds: float) -> bool:
    """Whether a connection whose request was answered is still open `seconds` later (keep-alive)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"}]}" not in answer:
            answer += conn.recv(65536)
        conn.settimeout(seconds)
        try:
            return conn.recv(1) != b""  # b"": the server closed it
        except socket.timeout:
            return True


def test_keep_alive_and_max_connections(tmp_path):
    """--keep-alive: an idle connection closes after it (behind a proxy, longer than the proxy's); --max-connections:
    connections past it get 503 at once, however many streams are held."""
    model_dir = save_tiny_model(tmp_path / "model")
    settings = ServeSettings(model_name="tiny")
    with running_server(engine_for(model_dir), settings, start_engine=False, keep_alive=0.5) as url:
        assert not _held_open(int(url.rsplit(":", 1)[1]), 3.0)
    with running_server(engine_for(model_dir), settings, start_engine=False, keep_alive=10,
                        max_connections=2) as url:
        port = int(url.rsplit(":", 1)[1])
        assert _held_open(port, 1.5)
        held = [socket.create_connection(("127.0.0.1", port), timeout=30)]
        time.sleep(0.2)
        try:
            assert httpx.get(url + "/v1/models", timeout=30).status_code == 200  # the second connection
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            time.sleep(0.2)
            assert httpx.get(url + "/v1/models", timeout=30).status_code == 503  # a third
        finally:
            for conn in held:
                conn.close()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/v1/models", timeout=30).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 200


def test_redirects_name_a_path_not_the_host_a_proxy_passed(tmp_path):
    """nginx passes its upstream address as the Host by default: an absolute Location sent clients there."""
    from flamingo.serve.middleware import _path_only

    settings = ServeSettings(model_name="tiny")
    with running_server(engine_for(save_tiny_model(tmp_path / "model")), settings, start_engine=False,
                        root_path="/flamingo") as url:
        moved = httpx.get(url + "/health/", headers={"Host": "10.0.0.7:8000"}, follow_redirects=False)
        assert moved.status_code == 307 and moved.headers["location"] == "/flamingo/health"
        moved = httpx.get(url + "/health/?a=1", follow_redirects=False)
        assert moved.headers["location"] == "/flamingo/health?a=1"
    host = "10.0.0.7:8000"
    assert _path_only(b"http://10.0.0.7:8000//evil.example/x", "http", host) == b"http://10.0.0.7:8000//evil.example/x"
    assert _path_only(b"http://10.0.0.7:80001/x", "http", host) == b"http://10.0.0.7:80001/x"  # another host
    assert _path_only(b"https://10.0.0.7:8000/x", "http", host) == b"https://10.0.0.7:8000/x"  # another scheme
    assert _path_only(b"http://10.0.0.7:8000", "http", host) == b"/"
    assert _path_only(b"http://10.0.0.7:8000?q", "http", host) == b"/?q"


def test_a_client_that_disconnects_frees_its_row(served):
    engine, url, _ = served
    before = engine.metrics.value("generation_tokens_total")
    body = {"messages": [{"role": "user", "content": "Output:"}], "max_tokens": 500, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 2:  # the role, then the first token: go away
                break
    deadline = time.monotonic() + 20
    while engine.running_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running_rows == 0
    assert engine.metrics.value("generation_tokens_total") - before < 500


def test_a_client_that_disconnects_before_its_whole_answer_frees_its_row(served):
    """Not streamed: the client goes away while its tokens keep coming; its rows are freed when the server sees the
    connection close, not at a later check (tokens made after the abort: a few steps', not a share of the run's)."""
    engine, url, _ = served
    before = engine.metrics.value("generation_tokens_total")
    body = {"messages": [{"role": "user", "content": "Output:"}], "max_tokens": 500, "temperature": 0,
            "logit_bias": {str(t): -100 for t in engine.eos}}  # no early stop: it would run 500 tokens
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.2)
    at_abort = engine.metrics.value("generation_tokens_total")
    deadline = time.monotonic() + 20
    while engine.running_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running_rows == 0
    after = engine.metrics.value("generation_tokens_total") - at_abort
    assert after <= max(8, (at_abort - before) / 4), (at_abort - before, after)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flamingo.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--grace", "20", "--prefix-cache-mib", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url):
            pytest.fail("the server did not come up")
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"messages": [{"role": "user", "content": "Output:"}], "max_tokens": 300, "temperature": 0,
                    "stream": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    started.set()

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        client.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" or lines[-2:] == ["data: [DONE]", ""]
    assert data[-1]["choices"][0]["finish_reason"] in ("length", "stop")  # finished, not cut off
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


SLOW_SERVER = """
import sys, time
from flamingo.serve.engine import Engine
from flamingo.serve.server import build_engine, serve, settings_for

step = Engine._decode_step


def slow_step(self):  # a decode step of a bigger model: an answer takes seconds
    time.sleep(0.05)
    return step(self)


Engine._decode_step = slow_step
model_dir, port, grace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
engine = build_engine(model_dir, max_batch=5)
engine.eos = set()  # no stop token: every answer runs its max_tokens
serve(engine, settings_for(model_dir), port=port, grace=grace, log_level="warning")
"""


@pytest.mark.slow
def test_sigterm_past_the_grace_ends_each_stream_with_an_error_event(tmp_path):
    """Streams still running when `--grace` runs out get an error event, then `[DONE]` (a whole answer a 500), while
    their connections are open, and the process exits 0 (before: uvicorn cancelled the requests first, cutting each
    stream mid-body with no error event)."""
    model_dir = save_tiny_model(tmp_path / "model")
    script = tmp_path / "slow_server.py"
    script.write_text(SLOW_SERVER)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(model_dir), str(port), "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    streams = {"chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Output:"}]}),
               "completion": ("/v1/completions", {"prompt": "Output:", "n": 2}),
               "responses": ("/v1/responses", {"input": "Output:", "max_output_tokens": 400})}
    lines: dict[str, list[str]] = {name: [] for name in streams}
    started = {name: threading.Event() for name in streams}
    whole: list[httpx.Response] = []
    try:
        if not wait_healthy(url):
            pytest.fail("the server did not come up")

        def stream(name: str) -> None:
            path, body = streams[name]
            fields = {} if name == "responses" else {"max_tokens": 400}
            with httpx.stream("POST", url + path, json={**body, **fields, "stream": True}, timeout=60) as response:
                for line in response.iter_lines():
                    lines[name].append(line)
                    if '"delta"' in line or '"text": "' in line:
                        started[name].set()

        def post_whole() -> None:
            whole.append(httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Output:"}], "max_tokens": 400}))

        clients = [threading.Thread(target=stream, args=(name,)) for name in streams]
        clients.append(threading.Thread(target=post_whole))
        for client in clients:
            client.start()
        for name in streams:
            assert started[name].wait(30), name
        # the whole request running beside the streams' 4 rows (not yet arrived, it would be refused as a request
        # arriving during the shutdown: a 503)
        deadline = time.monotonic() + 30
        while "flamingo_running_rows 5" not in httpx.get(url + "/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the whole request is not running"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for client in clients:
            client.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - signalled < 10  # the grace, not the answers' 20 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    log = proc.stdout.read().decode()
    assert "Traceback" not in log and "timeout graceful shutdown exceeded" not in log, log
    for name in ("chat", "completion"):
        data = [x[6:] for x in lines[name] if x.startswith("data: ")]
        assert data[-1] == "[DONE]", (name, lines[name][-3:])
        assert json.loads(data[-2])["error"]["message"] == "the server is shutting down", data[-2]
    events = [json.loads(x[6:]) for x in lines["responses"] if x.startswith("data: ")]
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"], events[-2:]
    assert whole[0].status_code == 500 and "shutting down" in whole[0].json()["error"]["message"]


def test_metrics_are_exact_past_a_million():
    """Prometheus counters are exact: 6 significant digits (`:g`) rendered 1234567 tokens as `1.23457e+06`, so
    `rate()` saw steps of 10 tokens and histogram sums drifted."""
    from flamingo.serve.metrics import Metrics

    metrics = Metrics()
    metrics.inc("prompt_tokens_total", 1234567)
    metrics.inc("generation_tokens_total", 98765432)
    metrics.inc("requests_total", 1000001, labels={"endpoint": "/v1/completions", "status": "200"})
    for _ in range(3):
        metrics.observe("time_to_first_token_seconds", 123456.789)
    lines = dict(line.rsplit(" ", 1) for line in metrics.render().splitlines() if not line.startswith("#"))
    assert lines["flamingo_prompt_tokens_total"] == "1234567"
    assert lines["flamingo_generation_tokens_total"] == "98765432"
    assert lines['flamingo_requests_total{endpoint="/v1/completions",status="200"}'] == "1000001"
    assert abs(float(lines["flamingo_time_to_first_token_seconds_sum"]) - 3 * 123456.789) < 1e-9
    assert lines["flamingo_time_to_first_token_seconds_count"] == "3" and lines["flamingo_queue_depth"] == "0"
