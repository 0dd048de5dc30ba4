"""Remote media URLs (`--allow-remote-media`): fetched from public addresses only unless the operator allows private
hosts, the check made on the address each connection reaches (so every redirect hop is checked), only http(s)
redirects followed, the size limit kept; over HTTP the refusal is a 400 and the server keeps serving. A local web
server on the loopback plays the remote host."""

from __future__ import annotations

import http.server
import io
import threading

import httpx
import pytest

from flamingo.serve import media
from flamingo.serve.app import ServeSettings
from flamingo.serve.media import MediaPolicy, load_medium, public_address
from flamingo.serve.protocol import APIError
from flamingo.tiny import random_image

from serve_helpers import data_url, engine_for, running_server, save_tiny_model


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def host():
    """A web server on every loopback address: /a.png, redirects to another loopback address and to ftp, a big
    file."""
    png = _png(1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            port = self.server.server_address[1]
            if self.path == "/a.png":
                self._send(200, png, "image/png")
            elif self.path == "/big.png":
                self._send(200, png + b"\0" * 5000, "image/png")
            elif self.path.startswith("/to/"):
                self.send_response(302)
                target = {"other-host": f"http://127.0.0.2:{port}/a.png", "ftp": "ftp://127.0.0.1/a.png"}
                self.send_header("Location", target[self.path[4:]])
                self.end_headers()
            else:
                self._send(404, b"", "text/plain")

        def _send(self, status, body, kind):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


REMOTE = MediaPolicy(allow_remote=True, max_bytes=len(_png(1)) + 100)


def _refusal(url, policy):
    with pytest.raises(APIError) as e:
        load_medium(url, policy)
    assert e.value.status == 400
    return e.value.message


def test_only_public_addresses_unless_private_hosts_are_allowed(host):
    assert "refused" in _refusal(host + "/a.png", MediaPolicy())
    assert "127.0.0.1, not a public address" in _refusal(host + "/a.png", REMOTE)
    allowed = MediaPolicy(allow_remote=True, allow_private=True, max_bytes=REMOTE.max_bytes)
    assert list(load_medium(host + "/a.png", allowed).getdata()) == list(random_image(1).getdata())
    assert "larger than" in _refusal(host + "/big.png", allowed)
    assert "ftp" in _refusal(host + "/to/ftp", allowed)  # a redirect to another scheme is not followed


def test_every_redirect_hop_is_checked(host, monkeypatch):
    """With 127.0.0.1 taken for a public address, a redirect from it to 127.0.0.2 (another internal address) is
    refused at the second hop."""
    monkeypatch.setattr(media, "public_address", lambda address: address == "127.0.0.1")
    assert list(load_medium(host + "/a.png", REMOTE).getdata()) == list(random_image(1).getdata())
    assert "127.0.0.2 is at 127.0.0.2, not a public address" in _refusal(host + "/to/other-host", REMOTE)


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("192.168.0.5", False), ("172.16.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fd00::1", False), ("fe80::1%2", False), ("::ffff:127.0.0.1", False),
    ("::ffff:8.8.8.8", True),
])
def test_public_address(address, public):
    assert public_address(address) is public


def test_over_http_a_private_url_is_a_400_and_allowed_hosts_answer_as_data_urls(host, tmp_path, one_thread):
    model_dir = save_tiny_model(tmp_path / "model")

    def ask(url, image_url):
        return httpx.post(url + "/v1/chat/completions", timeout=60, json={"max_tokens": 4, "temperature": 0,
                          "messages": [{"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": image_url}},
                              {"type": "text", "text": "What is it?"}]}]})

    for allow_private in (False, True):
        settings = ServeSettings(media=MediaPolicy(allow_remote=True, allow_private=allow_private))
        with running_server(engine_for(model_dir, max_batch=2, prefill_chunk=32), settings) as url:
            reply = ask(url, host + "/a.png")
            if allow_private:
                assert reply.status_code == 200
                expected = ask(url, data_url(random_image(1))).json()["choices"][0]["message"]["content"]
                assert reply.json()["choices"][0]["message"]["content"] == expected
            else:
                assert reply.status_code == 400 and "not a public address" in reply.json()["error"]["message"]
                assert ask(url, data_url(random_image(1))).status_code == 200  # still serving
