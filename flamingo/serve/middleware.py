"""The server's ASGI middleware: plain ASGI wrappers, so streamed bodies pass through untouched."""

from __future__ import annotations

from typing import Any


class CountRequests:
    """ASGI middleware: counts the generation endpoints' responses by status (a plain ASGI wrapper, so streamed
    bodies pass through untouched)."""

    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # the route's path: under a `--root-path` (a proxy's prefix), uvicorn's path holds the prefix too
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if root and scope.get("path", "").startswith(root) else scope.get("path")
        if scope["type"] != "http" or path not in self.PATHS:
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.inc("requests_total", labels={"endpoint": path, "status": str(message["status"])})
            await send(message)

        await self.app(scope, receive, counted)


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
