"""`flamingo serve --max-connections N` (docs/serve.md, "Limits and errors"): while more than N connections are open
(idle keep-alive ones count), a request on any of them is answered 503 at once and its connection closed, as an
answer of the app: an OpenAI-style body, `Retry-After`, the request's `X-Request-Id` (the official client's
`request_id`), and a count in `requests_total`. A connection that asked for a WebSocket upgrade is counted out when
it closes; a Batch API line, which comes through no connection, is never refused. With or without a limit, a
connection no request begins on within `--keep-alive` seconds is closed, and a request body that stops arriving for
that long is answered 408."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import openai
import pytest

from flamingo.serve.app import ServeSettings
from flamingo.serve.middleware import BATCH_LINE, ConnectionLimit, OpenConnections

from serve_helpers import engine_for, openai_client, running_server, save_tiny_model


def _exchange(port: int, request: bytes) -> bytes:
    """What the server sends on a new connection for `request`, up to its closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def _one_response(conn: socket.socket) -> bytes:
    """One whole response read from a kept-alive connection: its head, then its Content-Length of body (a response
    may arrive in several reads, and a read may end within it)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(65536)
        if not chunk:
            return received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def _until_served(url: str, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while (status := httpx.get(url + "/health", timeout=30).status_code) == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    return save_tiny_model(tmp_path_factory.mktemp("connections") / "model")


def test_a_request_past_the_limit_gets_an_answer_of_the_app(model_dir):
    engine = engine_for(model_dir)
    with running_server(engine, ServeSettings(model_name="tiny"), keep_alive=10, max_connections=1) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30):  # the one connection the limit allows
            time.sleep(0.2)
            raw = _exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: mine-1\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            head, _, body = raw.partition(b"\r\n\r\n")  # whole: the server closed the connection after it
            lines = head.decode().split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            assert lines[0] == "HTTP/1.1 503 Service Unavailable"
            assert headers["x-request-id"] == "mine-1" and headers["retry-after"] == "1"
            assert headers["connection"] == "close" and headers["content-type"] == "application/json"
            assert "x-should-retry" not in headers  # a retry may be answered
            error = httpx.Response(503, content=body).json()["error"]
            assert error["code"] == "too_many_connections" and error["type"] == "server_error"
            assert "--max-connections" in error["message"]

            with pytest.raises(openai.InternalServerError) as e:
                openai_client(url).chat.completions.create(model="tiny", max_tokens=1,
                                                           messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 503 and e.value.request_id.startswith("req_")
            assert e.value.code == "too_many_connections"
        assert _until_served(url) == 200
        assert engine.metrics.value("requests_total", {"endpoint": "/v1/chat/completions", "status": "503"}) == 2


def test_a_connection_that_asked_for_an_upgrade_is_counted_out(model_dir):
    """The server takes no WebSocket upgrade (no route needs one): the connection stays in the HTTP protocol, which
    counts its end, so such requests never leave the limit reached."""
    with running_server(engine_for(model_dir), ServeSettings(model_name="tiny"), start_engine=False, keep_alive=10,
                        max_connections=1) as url:
        port = int(url.rsplit(":", 1)[1])
        upgrade = (b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        for _ in range(3):
            assert _exchange(port, upgrade).startswith(b"HTTP/1.1 200")  # answered as a plain request
        assert _until_served(url, 2.0) == 200


def test_the_limit_counts_connections_and_requests_in_flight_and_spares_batch_lines():
    counter = OpenConnections(2)
    counter.open = 2
    assert not counter.full()
    counter.open = 3  # the request's own and two more
    assert counter.full()
    counter.open, counter.in_flight = 1, 3  # requests whose connections closed still run
    assert counter.full()
    with pytest.raises(ValueError):
        OpenConnections(0)

    answered = []

    async def app(scope, receive, send):
        answered.append(scope["path"])

    async def send(message):
        answered.append(message.get("status"))

    limit = ConnectionLimit(app, counter)
    asyncio.run(limit({"type": "http", "path": "/v1/chat/completions", BATCH_LINE: True}, None, send))
    asyncio.run(limit({"type": "http", "path": "/v1/chat/completions"}, None, send))
    assert answered == ["/v1/chat/completions", 503, None] and counter.in_flight == 3


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive(model_dir):
    """uvicorn's keep-alive timer starts after a response: a socket opened and left silent, or one that sent a byte,
    held its place under the limit for as long as its client kept it, and every other client got 503 (one idle
    `telnet` was enough). It is closed when no request has begun `--keep-alive` seconds after opening; a request
    sent in pieces within them is answered, and its connection then kept alive as any."""
    with running_server(engine_for(model_dir), ServeSettings(model_name="tiny"), start_engine=False, keep_alive=1,
                        max_connections=1) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server
            assert 0.5 < time.monotonic() - started < 10
            assert httpx.get(url + "/health", timeout=30).status_code == 200
        with socket.create_connection(("127.0.0.1", port), timeout=30) as dripping:  # a byte does not keep it
            dripping.sendall(b"G")
            started = time.monotonic()
            assert dripping.recv(1) == b"" and time.monotonic() - started < 10
        with socket.create_connection(("127.0.0.1", port), timeout=30) as talking:  # a request in time is answered
            time.sleep(0.3)
            talking.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            time.sleep(0.3)
            talking.sendall(b"\r\n")
            assert _one_response(talking).startswith(b"HTTP/1.1 200")
            time.sleep(0.6)  # past the first-request timer (1 s after opening), within the keep-alive after a
            # response: a connection a request began on is kept alive as any
            talking.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert _one_response(talking).startswith(b"HTTP/1.1 200")


def test_a_silent_connection_is_closed_without_a_connection_limit(model_dir):
    """Without `--max-connections` too: uvicorn would keep a silent socket for as long as its client keeps it (a file
    descriptor each, never given back)."""
    with running_server(engine_for(model_dir), ServeSettings(model_name="tiny"), start_engine=False,
                        keep_alive=1) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server
            assert 0.5 < time.monotonic() - started < 10
        assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_a_body_that_stops_arriving_is_answered_408_and_its_connection_closed(model_dir):
    """uvicorn times no request body: a head, then half a body and nothing more, held the connection and its task
    for as long as the client kept the socket. Each wait for the body is timed (`--keep-alive`), not the body as a
    whole: a body sent in pieces, each within it, is read."""
    with running_server(engine_for(model_dir), ServeSettings(model_name="tiny"), start_engine=False,
                        keep_alive=1, max_connections=2) as url:
        port = int(url.rsplit(":", 1)[1])
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nX-Request-Id: stalled\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(head + b"{")
            started = time.monotonic()
            raw = _one_response(stalled)
            assert 0.5 < time.monotonic() - started < 10
            lines = raw.partition(b"\r\n\r\n")[0].decode().split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            assert lines[0].startswith("HTTP/1.1 408") and headers["connection"] == "close"
            assert headers["x-request-id"] == "stalled"
            error = httpx.Response(408, content=raw.partition(b"\r\n\r\n")[2]).json()["error"]
            assert error["code"] == "request_timeout" and "--keep-alive" in error["message"]
            assert stalled.recv(1) == b""  # closed by the server
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:  # slower than 1 s in all
            slow.sendall(head.replace(b"Content-Length: 2", b"Content-Length: 4"))
            for piece in (b"{", b" ", b" ", b"}"):
                time.sleep(0.4)
                slow.sendall(piece)
            assert _one_response(slow).startswith(b"HTTP/1.1 400")  # read whole: `{  }` lacks the fields
        assert httpx.get(url + "/health", timeout=30).status_code == 200
