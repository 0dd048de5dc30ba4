"""Remote media URLs (`--allow-remote-media`): fetched from public addresses only unless the operator allows private
hosts, the check made on the address each connection reaches (so every redirect hop is checked), only http(s)
redirects followed, the size limit kept, the timeout over the whole download (a host trickling bytes is cut at it); a
host that answers no HTTP or a broken body, a URL that does not parse and a local path the file system refuses are
400s naming the medium; over HTTP the refusal is a 400 and the server keeps serving. Local servers on the loopback
play the remote hosts."""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time

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


DRIP = 0.25  # seconds between the bytes of a trickling host: every read comes well within the 1 s timeout


@pytest.fixture(scope="module")
def broken_host():
    """A TCP server on the loopback playing a broken or slow web host, by path: /garbage answers no HTTP, /chunked a
    chunked body that is not one; /drip-body sends a 12-byte body, /drip-unsized one without a length (it ends when
    the connection closes) and /drip-headers its status line, one byte every DRIP seconds; to a TLS client it
    drips the first record of a handshake."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
    body = b"\x89PNG\r\n\x1a\nabcd"
    replies = {
        b"/garbage": (b"HELLO I AM NOT HTTP\r\n\r\n",),
        b"/chunked": (head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",),
        b"/drip-body": (head + b"Content-Length: 12\r\n\r\n", *(bytes([b]) for b in body)),
        b"/drip-unsized": (head + b"Connection: close\r\n\r\n", *(bytes([b]) for b in body)),
        b"/drip-headers": (*(bytes([b]) for b in b"HTTP/1.0 200 OK\r\n\r\n"), body),
        b"/drip-tls": (b"\x16\x03\x03\x40\x00", *[b"\0"] * 20),  # a 16 KiB handshake record, byte by byte
    }

    def answer(conn):
        with conn:
            request = conn.recv(65536)
            path = request.split(b" ")[1] if request.startswith(b"GET ") else b"/drip-tls"
            for i, piece in enumerate(replies[path]):
                if i and (path.startswith(b"/drip") and stop.wait(DRIP)):
                    return
                try:
                    conn.sendall(piece)
                except OSError:  # the client gave up
                    return

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # closed at teardown
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


BROKEN = MediaPolicy(allow_remote=True, allow_private=True, remote_timeout=1.0)


@pytest.mark.parametrize("path,why", [("/garbage", "BadStatusLine"), ("/chunked", "IncompleteRead")])
def test_a_host_answering_no_http_or_a_broken_body_is_a_400(broken_host, path, why):
    message = _refusal(broken_host + path, BROKEN)
    assert message.startswith("media: cannot fetch") and why in message


def test_a_url_with_a_bad_port_is_a_400():
    assert "nonnumeric port" in _refusal("http://127.0.0.1:abc/a.png", BROKEN)  # refused before any connection


@pytest.mark.parametrize("path", ["/drip-body", "/drip-unsized", "/drip-headers", "/drip-tls"])
def test_the_timeout_bounds_the_whole_download_of_a_trickling_host(broken_host, path):
    """The host sends a byte every DRIP s, each read well within the 1 s timeout, and all of it in 3 s or more: the
    fetch is cut at 1 s, whether it is in the TLS handshake, the headers or the body, with or without a length."""
    url = broken_host.replace("http:", "https:") if path == "/drip-tls" else broken_host + path
    start = time.monotonic()
    message = _refusal(url, BROKEN)
    assert time.monotonic() - start < 2.0
    assert "did not download within the server's 1 s" in message


def test_the_timeout_bounds_the_host_name_lookup_too(host, monkeypatch):
    """A resolver that does not answer (`slow.invalid`) held the fetch past its deadline, for the system resolver's
    own timeouts: the lookup is waited for within the deadline, and a name that resolves (`fast.invalid`, to the
    loopback) still fetches."""
    real, release = socket.getaddrinfo, threading.Event()

    def getaddrinfo(name, port, *args, **kwargs):
        if name == "slow.invalid":
            release.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "resolver gave up")
        return real("127.0.0.1" if name == "fast.invalid" else name, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    port = host.rsplit(":", 1)[1]
    try:
        start = time.monotonic()
        message = _refusal(f"http://slow.invalid:{port}/a.png", BROKEN)
        assert time.monotonic() - start < 2.0
        assert "did not download within the server's 1 s" in message
    finally:
        release.set()
    image = load_medium(f"http://fast.invalid:{port}/a.png", BROKEN)
    assert list(image.getdata()) == list(random_image(1).getdata())


def test_a_local_path_the_file_system_refuses_is_a_400(tmp_path):
    """A name or path too long for the file system, a symlink loop: 400s naming the medium, the path cut short."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    local = MediaPolicy(root=tmp_path)
    for path in ("a" * 5000, "x/" * 3000 + "a.png", "loop"):
        message = _refusal(path, local)
        assert message.startswith("media: ") and len(message) < 400
    assert "File name too long" in _refusal("a" * 5000 + ".png", local)  # ("a" * 5000 alone reads as bare base64)


def test_over_http_a_broken_host_a_slow_one_and_a_bad_path_are_400s(broken_host, tmp_path, one_thread):
    model_dir = save_tiny_model(tmp_path / "model")
    (tmp_path / "media").mkdir()
    settings = ServeSettings(media=MediaPolicy(root=tmp_path / "media", allow_remote=True, allow_private=True,
                                               remote_timeout=1.0))

    def ask(url, image_url):
        return httpx.post(url + "/v1/chat/completions", timeout=60, json={"max_tokens": 2, "temperature": 0,
                          "messages": [{"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": image_url}},
                              {"type": "text", "text": "What is it?"}]}]})

    with running_server(engine_for(model_dir, max_batch=2, prefill_chunk=32), settings) as url:
        for image_url in (broken_host + "/garbage", broken_host + "/drip-body", "http://127.0.0.1:abc/a.png",
                          "a" * 5000):
            reply = ask(url, image_url)
            assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("medium 0: ")
        assert ask(url, data_url(random_image(1))).status_code == 200  # still serving
