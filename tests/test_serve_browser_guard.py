"""What a web page in the operator's browser cannot make the server do: a page of another site cannot post to it
(browsers mark such requests `Sec-Fetch-Site: cross-site`, and send forms and `no-cors` fetches as text/plain or
multipart, which need no CORS preflight), and a DNS-rebinding page (its own name re-pointed at 127.0.0.1, so
same-origin to the browser) is told apart by its Host header on a server bound to loopback."""

from __future__ import annotations

import socket

import httpx
import pytest

from flamingo.serve.app import ServeSettings
from flamingo.serve.middleware import host_of, loopback_interface
from flamingo.serve.server import exposure, settings_for

from serve_helpers import engine_for, running_server, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BODY = {"messages": [{"role": "user", "content": "Say:"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("guard") / "model")
    settings = settings_for(str(model_dir), host="127.0.0.1", allowed_hosts=["flamingo.example"])
    with running_server(engine_for(model_dir, max_batch=2), settings) as url:
        yield url


def test_a_loopback_server_answers_loopback_and_named_hosts_only(served):
    port = served.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "flamingo.example:443"):
        assert httpx.get(served + "/v1/models", headers={"Host": host}).status_code == 200, host
    refused = httpx.get(served + "/v1/models", headers={"Host": f"rebound.attacker.example:{port}"})
    assert refused.status_code == 403 and refused.headers["x-should-retry"] == "false"
    assert "names 'rebound.attacker.example:" in refused.json()["error"]["message"]
    assert "--allowed-host" in refused.json()["error"]["message"]
    assert httpx.get(served + "/", headers={"Host": "rebound.attacker.example"}).status_code == 403  # the page too


def _raw_get(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_request_without_a_host_header_is_answered(served):
    """HTTP/1.0 makes Host optional (health probes send none); a browser always sends one, so no Host is no page.
    A Host that is present but empty or unlisted stays refused."""
    for path in (b"/health", b"/v1/models"):
        answer = _raw_get(served, b"GET " + path + b" HTTP/1.0\r\n\r\n")
        assert answer.split(b"\r\n", 1)[0].endswith(b"200 OK"), answer[:200]
    for host in (b"", b"rebound.attacker.example"):
        answer = _raw_get(served, b"GET /health HTTP/1.0\r\nHost: " + host + b"\r\n\r\n")
        assert answer.split(b"\r\n", 1)[0].endswith(b"403 Forbidden"), answer[:200]


def test_a_page_of_another_site_cannot_post(served):
    for site in ("cross-site", "same-site"):  # same-site: another port of localhost
        refused = httpx.post(served + "/v1/chat/completions", json=BODY, headers={"Sec-Fetch-Site": site})
        assert refused.status_code == 403 and "another site" in refused.json()["error"]["message"]
    for site in ("same-origin", "none"):  # the server's own page; a URL typed in
        assert httpx.post(served + "/v1/chat/completions", json=BODY, headers={"Sec-Fetch-Site": site},
                          timeout=60).status_code == 200
    assert httpx.get(served + "/v1/models", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # reads


def test_json_bodies_must_be_json(served):
    """A form's or a `no-cors` fetch's body (text/plain) was read as JSON whatever its type."""
    import json

    text = json.dumps(BODY)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        refused = httpx.post(served + "/v1/chat/completions", content=text, headers={"Content-Type": kind})
        assert refused.status_code == 415, kind
        assert "send JSON with `Content-Type: application/json`" in refused.json()["error"]["message"]
    refused = httpx.post(served + "/v1/chat/completions", content=text, headers={"Origin": "http://evil.example"})
    assert refused.status_code == 415  # no type, from a web page: a `no-cors` fetch of a Blob
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json", None):  # none: as FastAPI
        headers = {"Content-Type": kind} if kind else {}
        assert httpx.post(served + "/v1/chat/completions", content=text, headers=headers,
                          timeout=60).status_code == 200, kind


def test_who_checks_hosts():
    assert loopback_interface("127.0.0.1") and loopback_interface("::1") and loopback_interface("[::1]")
    assert loopback_interface("localhost") and loopback_interface("127.0.0.2")
    assert not loopback_interface("0.0.0.0") and not loopback_interface("192.168.1.5")
    assert [host_of(h) for h in ("A.example:80", "[::1]:8000", "[::1]", "localhost", "::1")] == \
        ["a.example", "::1", "::1", "localhost", "::1"]
    assert ServeSettings().allowed_hosts is None  # the app alone (tests, Python users): any host
    assert settings_for("m", host="0.0.0.0").allowed_hosts is None  # every interface: names unknown
    assert settings_for("m", host="0.0.0.0", allowed_hosts=["a.example"]).allowed_hosts == \
        ("localhost", "127.0.0.1", "::1", "a.example")
    assert settings_for("m", host="127.0.0.2").allowed_hosts == ("localhost", "127.0.0.1", "::1", "127.0.0.2")


def test_a_server_beyond_loopback_without_a_key_is_warned_about():
    assert exposure("127.0.0.1", ServeSettings()) is None and exposure("::1", ServeSettings()) is None
    assert exposure("0.0.0.0", ServeSettings(api_key="k")) is None
    assert "serving on 0.0.0.0 without --api-key" in exposure("0.0.0.0", ServeSettings())


def test_refusals_and_errors_are_counted_batch_lines_are_not(tmp_path, monkeypatch):
    """A 500 (an exception the app's catch-all answers, outside the counting middleware) and the browser checks'
    403s were never counted: an alert on errors stayed at 0 while every request failed."""
    import asyncio

    from flamingo.serve.app import create_app
    from flamingo.serve.batch_lines import app_client

    engine = engine_for(save_tiny_model(tmp_path / "model"))
    with running_server(engine, ServeSettings(model_name="tiny"), start_engine=False) as url:
        assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                          headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        monkeypatch.setattr(engine, "submit_all", lambda *a, **k: 1 / 0)
        assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 500
        counted = httpx.get(url + "/metrics").text
    assert 'flamingo_requests_total{endpoint="/v1/completions",status="403"} 1' in counted
    assert 'flamingo_requests_total{endpoint="/v1/completions",status="500"} 1' in counted
    app = create_app(engine, ServeSettings(model_name="tiny"))

    async def a_batch_line() -> int:
        async with app_client(app, None) as client:
            return (await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})).status_code

    assert asyncio.run(a_batch_line()) == 500
    assert 'flamingo_requests_total{endpoint="/v1/completions",status="500"} 1' in engine.metrics.render()
