"""The server's ASGI middleware: plain ASGI wrappers, so streamed bodies pass through untouched."""

from __future__ import annotations

import json
from typing import Any

from .protocol import APIError

BATCH_LINE = "flamingo.batch_line"  # an ASGI scope key: the request is a Batch API line the server sends itself


class CountRequests:
    """ASGI middleware: counts the generation endpoints' responses to clients by status, refusals and errors
    included: an exception that leaves the app is answered 500 by Starlette's error handler, outside every
    middleware, so it is counted here as it passes. A Batch API line (`BATCH_LINE` in its scope: the batch runner
    sends it through the app) is no client's request and is not counted."""

    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # the route's path: under a `--root-path` (a proxy's prefix), uvicorn's path holds the prefix too
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if root and scope.get("path", "").startswith(root) else scope.get("path")
        if scope["type"] != "http" or path not in self.PATHS or scope.get(BATCH_LINE):
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.inc("requests_total", labels={"endpoint": path, "status": str(message["status"])})
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:
                self.metrics.inc("requests_total", labels={"endpoint": path, "status": "500"})
            raise


class RelativeRedirects:
    """Redirects (Starlette's added or removed trailing slash) name a path, not the host the request named: behind a
    reverse proxy that passes its own upstream address as the Host (nginx's default), an absolute `Location` would
    send the client to the internal address. A relative one resolves against the URL the client used
    (RFC 9110, 10.2.2)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"host"), None)

        async def relative(message: dict) -> None:
            if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
                message = {**message, "headers": [(name, _path_only(value, scope["scheme"], host)
                                                   if name.lower() == b"location" else value)
                                                  for name, value in message.get("headers", ())]}
            await send(message)

        await self.app(scope, receive, relative)


def _path_only(location: bytes, scheme: str, host: str | None) -> bytes:
    """`location` without its scheme and host when they are the request's own; any other as it is (and one whose
    path starts `//`, which a client would read as a host)."""
    own = f"{scheme}://{host}".encode("latin-1") if host else None
    if not own or not location.startswith(own):
        return location
    path = location[len(own):]
    if path[:1] == b"?":
        path = b"/" + path
    return path if path[:1] == b"/" and path[:2] != b"//" else (location if path else b"/")


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def loopback_interface(host: str) -> bool:
    """Whether `--host` binds the loopback interface only (then only this machine's browsers can reach the server)."""
    import ipaddress

    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """A Host header's name, without its port and IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BrowserGuard:
    """What a web page in the operator's browser must not make the server do.

    - A request that changes something (POST, DELETE) sent by a page of another site: browsers say so in
      `Sec-Fetch-Site` (the page here is same-origin; other clients send no such header). Without this, any site
      open in a browser on a machine that reaches the server could run chats and batches through "simple"
      cross-site requests (a form, a `no-cors` fetch), which need no CORS preflight.
    - With `allowed_hosts` (a server bound to loopback): a Host header naming another host. A DNS-rebinding page
      (its own name re-pointed at 127.0.0.1) is same-origin to the browser, so only the Host it sends gives it away.
    Both refusals are a 403 with an OpenAI-style error body."""

    def __init__(self, app: Any, allowed_hosts: Any = None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else frozenset(host_of(h) for h in allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        problem = None
        host = headers.get("host", "")
        if self.allowed is not None and host_of(host) not in self.allowed:
            problem = (f"the Host header names {host!r}, which this server does not answer to (it serves "
                       f"{', '.join(sorted(self.allowed))}): add the name with --allowed-host")
        elif scope["method"] in UNSAFE_METHODS and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            problem = ("a request sent by a page of another site (Sec-Fetch-Site: "
                       f"{headers['sec-fetch-site']}) is refused: this server's own page, and clients outside a "
                       "browser, are answered")
        if problem is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(APIError(403, problem, code="forbidden").body()).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
