"""A request's engine events as OpenAI writes them: one JSON body, or server-sent event chunks.

A request is one or more jobs (the completions API takes a list of prompts: prompt k's choice j is choice
`k * n + j`, as OpenAI numbers them). Each job's events arrive tagged with its index on one asyncio queue. Choices
carry their text (after the echoed prompt, for raw completions with `echo`) and, when the request asked for them,
their `logprobs` objects (serve/logprobs.py); the usage adds up the jobs'.
"""

from __future__ import annotations

import asyncio
import bisect
import json
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from ..model.logprobs import TokenLogprobs
from .engine import Event, Job
from .logprobs import CompletionLogprobs, TokenStrings, chat_entries
from .protocol import APIError


class Answer:
    """One job's choices: the echoed prompt and, when asked for, each choice's `logprobs` object."""

    def __init__(self, strings: TokenStrings, job: Job, chat: bool, echo: Optional[str], first_index: int) -> None:
        self.strings, self.job, self.chat, self.first_index = strings, job, chat, first_index
        self.echo_text = echo or ""
        self.asked = job.params.logprobs is not None
        n = job.params.n
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        self._completion = [CompletionLogprobs(strings) for _ in range(n)]
        self.prompt_logprobs: Optional[dict[str, list[Any]]] = None  # the echoed prompt's lists
        # completions: the characters of each choice's text sent so far, and its tokens whose offset that text has
        # not reached (held back, where a stop string may cut), sent once it does or, clamped, at the choice's end
        self._sent = [len(self.echo_text)] * n
        self._held: list[dict[str, list[Any]]] = [{} for _ in range(n)]

    def prompt(self, event: Event) -> None:
        """The echoed prompt's log-probabilities: its first token has none."""
        ids = self.job.prompt_ids.tolist()
        for c in self._completion:
            self.prompt_logprobs = c.add_prompt(ids, event.logprobs, self.echo_text)

    def token(self, event: Event) -> Optional[dict[str, Any]]:
        """Take a delta's token; returns the `logprobs` object of a stream chunk (None when not asked for): chat's
        holds the token; completions' the tokens that start within the text sent so far."""
        if not self.asked or event.token is None or event.logprobs is None:
            return None
        c = event.choice
        if self.chat:
            self._tokens[c].append(event.token)
            self._logprobs[c].append(event.logprobs)
            return {"content": chat_entries(self.strings, [event.token], event.logprobs), "refusal": None}
        self._sent[c] += len(event.text)
        held = self._held[c]
        for key, values in self._completion[c].add([event.token], event.logprobs).items():
            held[key] = held.get(key, []) + values
        ready = bisect.bisect_left(held["text_offset"], self._sent[c])  # offsets never decrease; one at the sent
        # end starts in text not sent yet: it comes with the chunk that sends it (or the finish)
        self._held[c] = {k: v[ready:] for k, v in held.items()}
        return {k: v[:ready] for k, v in held.items()}

    def finish(self, choice: int) -> Optional[dict[str, Any]]:
        """A choice's end: its text is whole, so no offset passes its end (a stop string's tokens, which the text
        leaves out, are at its end); returns the completions `logprobs` object of the tokens still held back."""
        if not self.asked or self.chat:
            return None
        end = self._sent[choice]
        body = self._completion[choice].body
        body["text_offset"] = [min(o, end) for o in body["text_offset"]]
        held, self._held[choice] = self._held[choice], {}
        if not held.get("tokens"):
            return None
        return {**held, "text_offset": [min(o, end) for o in held["text_offset"]]}

    def logprobs(self, choice: int) -> Optional[dict[str, Any]]:
        """A whole choice's `logprobs` object (None when not asked for)."""
        if not self.asked:
            return None
        if self.chat:
            parts = self._logprobs[choice]
            entries = chat_entries(self.strings, self._tokens[choice], TokenLogprobs.cat(parts)) if parts else []
            return {"content": entries, "refusal": None}
        return self._completion[choice].body


def add_usage(total: Optional[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return usage
    out = {k: total[k] + usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    cached = total["prompt_tokens_details"]["cached_tokens"] + usage["prompt_tokens_details"]["cached_tokens"]
    return {**out, "prompt_tokens_details": {"cached_tokens": cached}}


async def whole(events: asyncio.Queue, answers: list[Answer], chat: bool,
                receive: Callable[[], Awaitable[dict[str, Any]]]) -> Optional[tuple[list[dict[str, Any]], dict]]:
    """Wait for every job's end -> (choices, usage); None when the client went away first (its jobs cancelled).
    receive: the request's ASGI `receive`, its body read: it answers `http.disconnect` when the client goes."""
    texts = {(k, i): a.echo_text for k, a in enumerate(answers) for i in range(a.job.params.n)}
    reasons: dict[tuple[int, int], Optional[str]] = {}
    usage, open_jobs = None, len(answers)

    async def watch() -> None:  # as Starlette's StreamingResponse watches a stream's client
        while (await receive())["type"] != "http.disconnect":
            pass
        for a in answers:
            a.job.cancelled.set()  # the engine frees the rows at its next step
        events.put_nowait((-1, None))

    watcher = asyncio.create_task(watch())
    try:
        while open_jobs:
            k, event = await events.get()
            if event is None:
                return None
            answer = answers[k]
            if event.kind == "prompt":
                answer.prompt(event)
            elif event.kind == "delta":
                texts[k, event.choice] += event.text
                answer.token(event)
            elif event.kind == "finish":
                reasons[k, event.choice] = event.finish_reason
                answer.finish(event.choice)
            elif event.kind == "error":
                for a in answers:
                    a.job.cancelled.set()
                raise APIError(500, event.message, type="server_error")
            elif event.kind == "done":
                usage = add_usage(usage, event.usage)
                open_jobs -= 1
    finally:
        watcher.cancel()
    choices = []
    for (k, i), text in texts.items():
        body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choices.append({"index": answers[k].first_index + i, **body, "finish_reason": reasons.get((k, i)),
                        "logprobs": answers[k].logprobs(i)})
    return choices, usage


async def stream(events: asyncio.Queue, answers: list[Answer], head: dict[str, Any], kind: str, chat: bool,
                 include_usage: bool, failed: Callable[[], None] = lambda: None) -> AsyncIterator[str]:
    """The jobs' events as OpenAI stream chunks; the jobs are cancelled when the client goes away. failed: called
    when the stream ends with an error event (its 200 went out with its first chunk)."""
    chunk_kind = kind + ".chunk" if chat else kind

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({**head, "object": chunk_kind, "choices": choices, **extra}) + "\n\n"

    try:
        for a in answers:
            indices = range(a.first_index, a.first_index + a.job.params.n)
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in indices])
            elif a.echo_text and not a.job.params.echo_logprobs:
                yield chunk([{"index": i, "text": a.echo_text, "finish_reason": None, "logprobs": None}
                             for i in indices])
        usage, open_jobs = None, len(answers)
        while open_jobs:
            k, event = await events.get()
            a = answers[k]
            index = a.first_index + event.choice
            if event.kind == "prompt":
                a.prompt(event)
                yield chunk([{"index": a.first_index + i, "text": a.echo_text, "finish_reason": None,
                              "logprobs": a.prompt_logprobs} for i in range(a.job.params.n)])
            elif event.kind == "delta":
                body = {"delta": {"content": event.text}} if chat else {"text": event.text}
                yield chunk([{"index": index, **body, "finish_reason": None, "logprobs": a.token(event)}])
            elif event.kind == "finish":
                body = {"delta": {}} if chat else {"text": ""}
                yield chunk([{"index": index, **body, "finish_reason": event.finish_reason,
                              "logprobs": a.finish(event.choice)}])
            elif event.kind == "error":
                failed()
                yield "data: " + json.dumps(APIError(500, event.message, type="server_error").body()) + "\n\n"
                break
            elif event.kind == "done":
                usage = add_usage(usage, event.usage)
                open_jobs -= 1
        else:
            if include_usage:
                yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        for a in answers:
            a.job.cancelled.set()  # a no-op for a finished job; frees the rows of an abandoned one
