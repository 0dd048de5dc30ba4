"""The server's ASGI middleware: plain ASGI wrappers, so streamed bodies pass through untouched."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from contextvars import ContextVar
from typing import Any, Optional

from .protocol import APIError

log = logging.getLogger(__name__)
BATCH_LINE = "flamingo.batch_line"  # an ASGI scope key: the request is a Batch API line the server sends itself
REQUEST_ID = "flamingo.request_id"  # an ASGI scope key: the request's id (`RequestIds`)
MAX_REQUEST_ID = 128  # characters of a client's own X-Request-Id (OpenAI's ids: `req_` and 32 hex digits)
# the id of the request being answered, for log lines written in its task (uvicorn's access line)
current_request_id: ContextVar[Optional[str]] = ContextVar("flamingo_request_id", default=None)


def request_id(header: Optional[str]) -> str:
    """A request's id: the client's `X-Request-Id` when it is 1 to `MAX_REQUEST_ID` printable ASCII characters (it
    goes into log lines, where a line break or a control character could forge one), else a new one in OpenAI's
    form."""
    if header and len(header) <= MAX_REQUEST_ID and header.isascii() and header.isprintable() \
            and header == header.strip():
        return header
    return "req_" + uuid.uuid4().hex


def header(scope: dict, name: bytes) -> Optional[str]:
    """The first value of the request header `name` (lower case, as ASGI servers give names), None when absent."""
    return next((value.decode("latin-1") for key, value in scope.get("headers", ()) if key.lower() == name), None)


async def send_error(send: Any, error: APIError) -> None:
    """Answer with `error` straight from an ASGI middleware (before the app): its OpenAI-style JSON body, its status
    and its headers (`APIError.response_headers`), as the app's own error handler answers."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.response_headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestIds:
    """ASGI middleware, the outermost: every response carries its request's `X-Request-Id` (`request_id`), and the
    server's log lines about the request name it (the route's in `REQUEST_ID` of the scope, uvicorn's access line
    through `current_request_id`). An exception that leaves the app is logged here, once, with the id, and answered
    500 with an OpenAI-style body; after a response started (a stream), its connection is closed instead, the
    stream cut (uvicorn logs that the response did not complete)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope[REQUEST_ID] = request_id(header(scope, b"x-request-id"))
        started = False

        async def tagged(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        token = current_request_id.set(rid)
        try:
            await self.app(scope, receive, tagged)
        except Exception as e:
            log.exception("request %s: internal error", rid)
            if not started:
                await send_error(tagged, APIError(500, f"internal error: {type(e).__name__}", type="server_error"))
        finally:
            current_request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives a log record the id of the request being answered in its task (`request_id`, "-" outside one): uvicorn's
    access lines name it (`server.uvicorn_config`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get() or "-"
        return True


class CountRequests:
    """ASGI middleware: counts the generation endpoints' responses to clients by status, refusals and errors
    included: an exception that leaves the app is answered 500 by `RequestIds`, outside this middleware, so it is
    counted here as it passes (one after the response started is a stream cut: `stream_errors_total`, as a stream
    that ends with an error event is). A Batch API line (`BATCH_LINE` in its scope: the batch runner sends it
    through the app) is no client's request and is not counted."""

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
            if started:
                self.metrics.inc("stream_errors_total", labels={"endpoint": path})
            else:
                self.metrics.inc("requests_total", labels={"endpoint": path, "status": "500"})
            raise


class OpenConnections:
    """The server's open connections, counted at the socket (`protocol`: uvicorn's HTTP protocol, counting), and the
    requests in flight through the app (`ConnectionLimit`): what `--max-connections` bounds (limit None: counted,
    not bounded)."""

    def __init__(self, limit: Optional[int] = None, silent_seconds: Optional[float] = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"the connection limit must be >= 1, got {limit}")
        self.limit, self.open, self.in_flight = limit, 0, 0
        # a connection whose first request has not begun (its head complete) this long after opening is closed:
        # uvicorn's keep-alive timer starts only after a response, and no timer covers a request head sent in part,
        # so a silent socket, or one that sent a byte, would stay open for as long as its client keeps it (a file
        # descriptor each, and under a limit a place) (None: kept)
        self.silent_seconds = silent_seconds

    def full(self) -> bool:
        """Whether a request arriving now is past the limit (its own connection counts, as in uvicorn's
        `limit_concurrency`, which this replaces: an idle keep-alive connection counts too)."""
        return self.limit is not None and (self.open > self.limit or self.in_flight >= self.limit + 1)

    def protocol(self, base: type) -> type:
        """`base` (an asyncio protocol: uvicorn's HTTP protocol) counting its connections here. A connection is
        counted from `connection_made` to `connection_lost`, asyncio's calls that frame every connection; it never
        changes protocol, since the server takes no WebSocket upgrade (`server.uvicorn_config`)."""
        counter = self

        class Counted(base):  # type: ignore[misc, valid-type]
            _first_request: Optional[asyncio.TimerHandle] = None  # closes a connection no request has begun on

            def connection_made(self, transport: Any) -> None:
                counter.open += 1
                super().connection_made(transport)
                if counter.silent_seconds is not None:
                    self._first_request = asyncio.get_running_loop().call_later(counter.silent_seconds,
                                                                                self._close_if_no_request, transport)

            def _close_if_no_request(self, transport: Any) -> None:
                # uvicorn's protocols (h11's, httptools') set `cycle` when a request's head is complete
                if getattr(self, "cycle", None) is None:
                    transport.close()

            def connection_lost(self, exc: Optional[Exception]) -> None:
                if self._first_request is not None:
                    self._first_request.cancel()
                counter.open -= 1
                super().connection_lost(exc)

        return Counted


class ConnectionLimit:
    """ASGI middleware, inside `RequestIds` and `CountRequests`: `--max-connections`. A client's request that arrives
    while more than `limit` connections are open, or `limit` other requests are in flight, is answered 503 at once,
    before any work, and its connection closed (`Connection: close`): uvicorn's `limit_concurrency` semantics, with
    an OpenAI-style body, `Retry-After`, the request's `X-Request-Id` and a count in the metrics. A Batch API line
    (`BATCH_LINE`) comes through no connection and is neither refused nor counted."""

    RETRY_AFTER = 1  # seconds: a stream ends, or an idle connection closes (`--keep-alive`), in about that time

    def __init__(self, app: Any, connections: Optional[OpenConnections]) -> None:
        self.app, self.connections = app, connections

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        counter = self.connections
        if counter is None or counter.limit is None or scope["type"] != "http" or scope.get(BATCH_LINE):
            await self.app(scope, receive, send)
            return
        if counter.full():
            log.warning("request %s: %d connections open, %d requests in flight, more than --max-connections %d: "
                        "answered 503", scope.get(REQUEST_ID), counter.open, counter.in_flight, counter.limit)
            await send_error(send, APIError(503, f"more than {counter.limit} connections are open to the server "
                                                 "(--max-connections); try again shortly", type="server_error",
                                            code="too_many_connections",
                                            headers={"Retry-After": str(self.RETRY_AFTER), "Connection": "close"}))
            return
        counter.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            counter.in_flight -= 1


class BodyTimeout:
    """ASGI middleware, the innermost: a request whose body stops arriving for `seconds` (`--keep-alive`) while the
    route waits for it is answered 408 and its connection closed. uvicorn times no request body: a client that sends
    a head and then part of a body, or a byte now and then, would hold its connection, its task and the body read so
    far (up to `--max-body-mb`) for as long as it keeps the socket, and under `--max-connections` a place. Only the
    waits for the body are timed: once it is whole, `receive` waits for a disconnect as long as the route asks."""

    def __init__(self, app: Any, seconds: Optional[float]) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        seconds = self.seconds
        if seconds is None or scope["type"] != "http" or scope.get(BATCH_LINE):
            await self.app(scope, receive, send)
            return
        whole = False

        async def timed() -> dict:
            nonlocal whole
            if whole:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), seconds)  # (asyncio.timeout is Python 3.11's)
            except asyncio.TimeoutError:
                whole = True  # no more of it is read: the answer closes the connection
                raise APIError(408, f"the request body stopped arriving: nothing came for {seconds:g} "
                                    f"second{'' if seconds == 1 else 's'} (--keep-alive)", code="request_timeout",
                               headers={"Connection": "close"}) from None
            whole = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


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
        host = header(scope, b"host")

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
      A request with no Host header (HTTP/1.0) is answered.
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
        host = headers.get("host")
        # no Host at all is an HTTP/1.0 client (a health probe), never a browser: browsers always send one
        if self.allowed is not None and host is not None and host_of(host) not in self.allowed:
            problem = (f"the Host header names {host!r}, which this server does not answer to (it serves "
                       f"{', '.join(sorted(self.allowed))}): add the name with --allowed-host")
        elif scope["method"] in UNSAFE_METHODS and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            problem = ("a request sent by a page of another site (Sec-Fetch-Site: "
                       f"{headers['sec-fetch-site']}) is refused: this server's own page, and clients outside a "
                       "browser, are answered")
        if problem is None:
            await self.app(scope, receive, send)
            return
        await send_error(send, APIError(403, problem, code="forbidden"))
