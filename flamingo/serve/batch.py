"""`flamingo batch`: a file of requests in OpenAI's Batch API format, answered offline by the server's own endpoints.

Input: JSONL, one request per line, as OpenAI's Batch API (and vLLM's `run_batch`) take them:

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [...]}}

`url`: /v1/chat/completions, /v1/completions or /v1/responses; `body`: what that endpoint takes, not streamed.
Output: JSONL in input order, as OpenAI's batch output file:

    {"id": "batch_req_1", "custom_id": "q-1", "response": {"status_code": 200, "request_id": "req_1", "body": {...}},
     "error": null}

A request the endpoint refuses keeps its status code and error body (400 for a bad image, ...); a line that is no
request at all (not JSON, no `custom_id`, a `custom_id` seen before, another method or URL, `stream: true`) gets
`response: null` and an `error` with a code and a message. The run never stops on one bad line.

The requests go through the app `flamingo serve` runs (its checks, chat format, media policy and answers), in this
process and `concurrency` at a time, so that the engine batches them as it would concurrent clients; a queue-full
answer (429) is retried.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..runtime.checkpoint_io import atomic_file
from .app import ServeSettings, create_app
from .engine import Engine

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


@dataclass
class BatchReport:
    requests: int = 0  # lines read
    succeeded: int = 0  # answered with status 200
    failed: dict[int, int] = field(default_factory=dict)  # status code -> requests the endpoint refused
    invalid: int = 0  # lines that are no request (error, no response)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "succeeded": self.succeeded,
                "failed": {str(k): v for k, v in sorted(self.failed.items())}, "invalid": self.invalid,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "seconds": round(self.seconds, 3),
                "completion_tokens_per_s": round(self.completion_tokens / self.seconds, 2) if self.seconds else None}


def parse_line(line: str, seen: set[str]) -> tuple[Optional[str], Optional[dict[str, Any]], Optional[dict[str, str]]]:
    """One input line -> (custom_id, request, error): a request to send, or the error that replaces its response."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, {"code": "invalid_json", "message": f"not JSON: {e}"}
    if not isinstance(request, dict):
        return None, None, {"code": "invalid_request", "message": "a request is a JSON object"}
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, None, {"code": "invalid_request", "message": "custom_id must be a non-empty string"}
    if custom_id in seen:
        return custom_id, None, {"code": "duplicate_custom_id", "message": f"custom_id {custom_id!r} is used twice"}
    seen.add(custom_id)
    if request.get("method", "POST") != "POST":
        return custom_id, None, {"code": "invalid_request", "message": "method must be POST"}
    if request.get("url") not in URLS:
        return custom_id, None, {"code": "invalid_url", "message": f"url must be one of {list(URLS)}, got "
                                                                   f"{request.get('url')!r}"}
    body = request.get("body")
    if not isinstance(body, dict):
        return custom_id, None, {"code": "invalid_request", "message": "body must be a JSON object"}
    if body.get("stream"):
        return custom_id, None, {"code": "invalid_request", "message": "a batch request is not streamed (stream: "
                                                                       "true)"}
    return custom_id, {"url": request["url"], "body": body}, None


async def _answer(client: Any, request: dict[str, Any], limit: asyncio.Semaphore) -> tuple[int, Any]:
    async with limit:
        for attempt in range(1000):
            response = await client.post(request["url"], json=request["body"])
            if response.status_code != 429:
                break
            await asyncio.sleep(min(1.0, 0.05 * (attempt + 1)))  # the engine's queue is full: wait for room
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, {"error": {"message": response.text}}


async def _run(engine: Engine, settings: ServeSettings, requests: list[Optional[dict[str, Any]]], concurrency: int,
               progress: bool) -> list[Optional[tuple[int, Any]]]:
    import httpx
    from tqdm.auto import tqdm

    app = create_app(engine, settings)
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=sum(r is not None for r in requests), desc="batch", unit="req", disable=not progress)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://flamingo-batch",
                                 timeout=None) as client:
        async def one(request: Optional[dict[str, Any]]) -> Optional[tuple[int, Any]]:
            if request is None:
                return None
            result = await _answer(client, request, limit)
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(r) for r in requests))
    bar.close()
    return list(results)


def run_batch(engine: Engine, settings: ServeSettings, input_path: str, output_path: str, *,
              concurrency: Optional[int] = None, progress: bool = True) -> BatchReport:
    """Answer every request of `input_path` into `output_path` (written whole, then renamed into place). The engine
    is started here and stopped at the end. concurrency: requests in flight (default: twice the engine's batch,
    within its queue)."""
    report = BatchReport()
    seen: set[str] = set()
    parsed = []
    with open(input_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                parsed.append(parse_line(line, seen))
    report.requests = len(parsed)
    concurrency = concurrency or min(2 * engine.max_batch, engine.max_queue)
    start = time.monotonic()
    engine.start()
    try:
        answers = asyncio.run(_run(engine, settings, [request for _, request, _ in parsed], concurrency, progress))
    finally:
        engine.stop(0.0)
    report.seconds = time.monotonic() - start
    lines = []
    for n, ((custom_id, _, error), answer) in enumerate(zip(parsed, answers), 1):
        entry: dict[str, Any] = {"id": f"batch_req_{n}", "custom_id": custom_id, "response": None, "error": error}
        if answer is not None:
            status, body = answer
            entry["response"] = {"status_code": status, "request_id": f"req_{n}", "body": body}
            if status == 200:
                report.succeeded += 1
                usage = body.get("usage") or {}
                report.prompt_tokens += int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
                report.completion_tokens += int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
            else:
                report.failed[status] = report.failed.get(status, 0) + 1
        else:
            report.invalid += 1
        lines.append(json.dumps(entry) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with atomic_file(output_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(lines)
    return report
