"""A Responses API request's engine events as OpenAI writes them: one `response` object, or its stream of typed
server-sent events (`response.created`, `response.in_progress`, the output item and its text part added, text
deltas, their done events, then `response.completed`, or `response.incomplete` when `max_output_tokens` cut the
answer). One request is one job with one choice (the API has no `n`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any, AsyncIterator, Callable, Optional

from .engine import Job
from .protocol import ResponsesRequest


def response_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """A chat completion's usage object in the Responses API's names. `cache_write_tokens` (the prompt tokens OpenAI
    bills for writing to its cache) is 0: the prefix cache stores prompts at no cost to a client."""
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def status_of(finish_reason: Optional[str]) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class ResponseWriter:
    """The response object of one request, at each stage of its life."""

    def __init__(self, req: ResponsesRequest, model_name: str, job: Job) -> None:
        self.req, self.model_name = req, model_name
        self.id, self.message_id = "resp_" + job.id, "msg_" + job.id
        self.created = int(time.time())

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [self.part(text)] if status != "in_progress" else []}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def body(self, status: str, text: Optional[str] = None, usage: Optional[dict[str, Any]] = None,
             error: Optional[str] = None) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": {"code": "server_error", "message": error} if error else None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.model_name, "output": [] if text is None else [self.message(text, status)],
                "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
                "store": False, "temperature": req.temperature, "top_p": req.top_p,
                "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
                "tool_choice": req.tool_choice or "auto", "tools": [], "truncation": "disabled",
                "usage": None if usage is None else response_usage(usage), "user": req.user,
                "metadata": req.metadata or {}}


async def stream_response(events: asyncio.Queue, job: Job, writer: ResponseWriter,
                          failed: Callable[[], None] = lambda: None) -> AsyncIterator[str]:
    """The job's events as the Responses API's stream; the job is cancelled when the client goes away. failed:
    called when the stream ends with an error event (its 200 went out with its first chunk)."""
    sequence = itertools.count()
    where = {"item_id": writer.message_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> str:
        return f"event: {kind}\ndata: " + json.dumps({"type": kind, "sequence_number": next(sequence), **fields}) \
            + "\n\n"

    try:
        yield event("response.created", response=writer.body("in_progress"))
        yield event("response.in_progress", response=writer.body("in_progress"))
        yield event("response.output_item.added", output_index=0, item=writer.message("", "in_progress"))
        yield event("response.content_part.added", **where, part=writer.part(""))
        text, reason = "", None
        while True:
            _, e = await events.get()
            if e.kind == "delta" and e.text:
                text += e.text
                yield event("response.output_text.delta", **where, delta=e.text, logprobs=[])
            elif e.kind == "finish":
                reason = e.finish_reason
            elif e.kind == "error":
                failed()
                yield event("error", code="server_error", message=e.message, param=None)
                yield event("response.failed", response=writer.body("failed", text, error=e.message))
                return
            elif e.kind == "done":
                usage = e.usage
                break
        status = status_of(reason)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=writer.part(text))
        yield event("response.output_item.done", output_index=0, item=writer.message(text, status))
        yield event(f"response.{status}", response=writer.body(status, text, usage))
    finally:
        job.cancelled.set()  # a no-op for a finished job; frees the rows of an abandoned one
