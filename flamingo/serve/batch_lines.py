"""The lines of an OpenAI Batch API file: parsed, sent through the server's own app, written as output entries.

`flamingo batch` (serve/batch.py) and the HTTP Batch API (serve/batch_runner.py) share this core, so a line gets the
same checks, the same answer and the same output entry either way.

Input, one request per line:

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [...]}}

Output entry, as OpenAI's batch output and error files hold them (`id` random and unique, as OpenAI's; `custom_id`
joins an entry to its request):

    {"id": "batch_req_<hex>", "custom_id": "q-1", "response": {"status_code": 200, "request_id": "req_<hex>",
     "body": {...}}, "error": null}

`request_id` is the `X-Request-Id` the line's request was sent with: the server's log lines about it (the traceback
of its 500) name it.

A line that is no request (not JSON, no `custom_id`, a `custom_id` seen before, another method or URL,
`stream: true`) gets `response: null` and an `error` with a code and a message that starts with its line's number
in the file. A request is sent as Python's `json` writes it, so NaN or a lone surrogate gets the endpoint's 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import httpx

from ..runtime.text import file_encoding
from .batch_store import new_id
from .middleware import BATCH_LINE, request_id
from .protocol import APIError

log = logging.getLogger(__name__)

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

Answer = tuple[int, Any]  # (HTTP status, decoded body)


@dataclass(frozen=True)
class Line:
    """One non-blank input line: a request to send, or the error that replaces its response."""

    custom_id: Optional[str]
    request: Optional[dict[str, Any]]  # {"url", "body", "request_id"}; None: the line is no request
    error: Optional[dict[str, str]] = None  # {"code", "message"} when request is None


def parse_line(line: str, seen: set[str], number: Optional[int] = None) -> Line:
    """One input line -> a Line; `seen` collects the custom_ids so far (a second use is refused). number: the line's
    number in its file (from 1), which starts its error's message (an error entry of a line with no custom_id has
    nothing else that ties it to its line)."""
    parsed = _parse_line(line, seen)
    if parsed.error is not None and number is not None:
        return Line(parsed.custom_id, None, {**parsed.error, "message": f"line {number}: {parsed.error['message']}"})
    return parsed


def load_json(line: str) -> Any:
    """A line's JSON value; ValueError (a JSONDecodeError, or "nested too deeply") when it has none."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _parse_line(line: str, seen: set[str]) -> Line:
    try:
        request = load_json(line)
    except ValueError as e:
        return Line(None, None, {"code": "invalid_json", "message": f"not JSON: {e}"})
    if not isinstance(request, dict):
        return Line(None, None, {"code": "invalid_request", "message": "a request is a JSON object"})
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Line(None, None, {"code": "invalid_request", "message": "custom_id must be a non-empty string"})
    if custom_id in seen:
        return Line(custom_id, None, {"code": "duplicate_custom_id",
                                      "message": f"custom_id {custom_id!r} is used twice"})
    seen.add(custom_id)
    if request.get("method", "POST") != "POST":
        return Line(custom_id, None, {"code": "invalid_request", "message": "method must be POST"})
    if request.get("url") not in URLS:
        return Line(custom_id, None, {"code": "invalid_url", "message": f"url must be one of {list(URLS)}, got "
                                                                       f"{request.get('url')!r}"})
    body = request.get("body")
    if not isinstance(body, dict):
        return Line(custom_id, None, {"code": "invalid_request", "message": "body must be a JSON object"})
    if body.get("stream"):
        return Line(custom_id, None, {"code": "invalid_request",
                                      "message": "a batch request is not streamed (stream: true)"})
    return Line(custom_id, {"url": request["url"], "body": body, "request_id": request_id(None)})


def parse_lines(lines: Iterable[str]) -> list[Line]:
    """The non-blank lines of a file, parsed in order (an error names its line's number in the file)."""
    seen: set[str] = set()
    return [parse_line(line, seen, n) for n, line in enumerate(lines, 1) if line.strip()]


def read_lines(path: str) -> list[str]:
    """A batch input file's lines, split at newlines only (JSON strings may hold U+2028, \\x85 and their kin raw).
    A UTF-8 BOM (Windows editors write one) is dropped, and a UTF-16 or UTF-32 file with one (Notepad's "Unicode")
    is read as such; a byte that is not UTF-8 costs its line that character, not the file."""
    with open(path, encoding=file_encoding(path), errors="replace") as f:
        return f.read().split("\n")


def app_client(app: Any, api_key: Optional[str]) -> httpx.AsyncClient:
    """A client that calls `app` in this process (no socket), with the server's key when it has one. An exception
    in the app is its line's 500, logged with the line's request id (middleware.RequestIds), as a socket client's
    would be."""

    async def line(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, BATCH_LINE: True}, receive, send)  # not counted as a client's request

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=line), base_url="http://localhost", headers=headers,
                             timeout=None)  # a Host any server answers


async def _answer(client: httpx.AsyncClient, request: dict[str, Any],
                  stop: Optional[asyncio.Event] = None) -> Optional[Answer]:
    """A line's answer. A 429 (the engine's queue is full: interactive clients come first) is retried until there is
    room, however long that takes within the batch's window; None: `stop` was set (the batch was cancelled or
    expired) before the line found room, so it was never run."""
    # encoded as Python's json does by default (not httpx's `json=`, which raises on NaN and on a lone surrogate):
    # the endpoint answers such a line with its 400, as it would an interactive client's
    content = json.dumps(request["body"]).encode()
    attempt = 0
    while True:
        headers = {"content-type": "application/json", "x-request-id": request["request_id"]}
        response = await client.post(request["url"], content=content, headers=headers)
        if response.status_code != 429:
            break
        attempt += 1
        await asyncio.sleep(min(1.0, 0.05 * attempt))
        if stop is not None and stop.is_set():
            return None
    try:
        return response.status_code, response.json()
    except ValueError:  # no JSON body (an app that failed before it answered sends none)
        return response.status_code, {"error": {"message": response.text or f"HTTP {response.status_code}"}}


async def send_all(client: httpx.AsyncClient, lines: list[Line], concurrency: int, *,
                   stop: Optional[asyncio.Event] = None,
                   on_answer: Optional[Callable[[int, Answer], None]] = None,
                   batch: Optional[str] = None) -> list[Optional[Answer]]:
    """Each line's request through `client`, at most `concurrency` in flight; answers in line order. None: the line
    is no request, or `stop` was set before its turn (requests already sent finish). on_answer(index, answer) runs
    as each answer arrives. batch: what the lines are of (a batch's id), named with each line's request id and
    custom_id in the log line of a request that failed to send."""
    if concurrency < 1:
        raise ValueError(f"a batch's concurrency must be >= 1, got {concurrency}")
    limit = asyncio.Semaphore(concurrency)

    async def one(k: int, line: Line) -> Optional[Answer]:
        if line.request is None:
            return None
        async with limit:
            if stop is not None and stop.is_set():
                return None
            try:
                answer = await _answer(client, line.request, stop)
            except Exception as e:  # one line's failure is its own error entry, never the batch's end
                # custom_id by repr: a client's string, whose line breaks must not forge log lines
                log.exception("request %s: batch %s, line custom_id %r: its request failed to send",
                              line.request["request_id"], batch or "-", line.custom_id)
                answer = 500, APIError(500, f"internal error: {type(e).__name__}", type="server_error").body()
        if on_answer is not None and answer is not None:
            on_answer(k, answer)
        return answer

    return list(await asyncio.gather(*(one(k, line) for k, line in enumerate(lines))))


def entry(line: Line, answer: Optional[Answer]) -> dict[str, Any]:
    """A line's output entry."""
    out: dict[str, Any] = {"id": new_id("batch_req_"), "custom_id": line.custom_id, "response": None,
                           "error": line.error}
    if answer is not None:
        status, body = answer
        out["response"] = {"status_code": status, "request_id": line.request["request_id"], "body": body}
    return out


def tokens_of(body: Any) -> tuple[int, int, int]:
    """(prompt, completion, cached prompt) tokens of an answer's usage, in the chat or the Responses API's names."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    return (int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0),
            int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0),
            int(details.get("cached_tokens", 0) or 0))
