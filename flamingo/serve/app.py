"""The HTTP side of `flamingo serve`: FastAPI routes, request checks, streaming, OpenAI-style errors.

Every check happens here, before any model work: body size, JSON, field types, the API key, media (count, policy,
pixels), prompt length against the LM's positions, `max_tokens` against the cap. A request that passes becomes an
engine `Job`; its events come back through an asyncio queue and go out as one JSON body or as server-sent events
(`data: {...}` chunks, then `data: [DONE]`), with OpenAI's `logprobs` objects when asked for (serve/logprobs.py) and,
for raw completions with `echo`, the prompt before the answer. A client that disconnects cancels its job (its rows
leave at the next decode step).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model.backbones import lm_max_positions
from ..model.logprobs import TokenLogprobs
from .engine import Engine, Event, Job, NotAccepting, QueueFull
from .logprobs import CompletionLogprobs, TokenStrings, chat_entries
from .media import MediaPolicy, load_medium
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from .sampling import SamplingParams
from .template import MediaRef, chat_prompt

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    """The operator's limits (the `flamingo serve` options)."""

    model_name: str = "flamingo"
    api_key: Optional[str] = None  # when set, /v1/* and /metrics need `Authorization: Bearer <key>`
    max_body_bytes: int = 20 * 2**20
    max_tokens_cap: int = 512  # the most `max_tokens` a request may ask for (and the default, within positions)
    max_images: int = 32  # media parts per prompt
    media: MediaPolicy = field(default_factory=MediaPolicy)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The app around a started (or to-be-started) engine; the lifespan stops the engine when the server ends."""
    processor, model = engine.processor, engine.model
    positions = lm_max_positions(model.lm)
    vocab = model.lm.get_output_embeddings().weight.shape[0]  # logits per position
    metrics = engine.metrics
    strings = TokenStrings(processor.tokenizer)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.stop, 0.0)  # uvicorn has let in-flight requests finish (its grace period)

    app = FastAPI(title="flamingo serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    app.add_middleware(_CountRequests, metrics=metrics)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                                "(--max-body-mb)", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None

    def prepare(text: str, refs: list[MediaRef], req: Any, chat: bool) -> Job:
        """Media, tokens and limits -> a Job (runs in a worker thread: decoding media takes time)."""
        if len(refs) > settings.max_images:
            raise APIError(400, f"{len(refs)} images/videos, more than the {settings.max_images} this server "
                                "accepts per prompt", param="messages" if chat else "media")
        if model.references is not None and len(refs) > model.references[1]:
            raise APIError(400, f"{len(refs)} images, more than the model's {model.references[1]} reference tokens")
        frames = [load_medium(r.url, settings.media, video=r.video, fps=processor.video_fps,
                              max_frames=processor.max_frames, where=f"medium {i}") for i, r in enumerate(refs)]
        try:
            ids, media = processor.encode_prompt(text, frames, max_length=2**62,
                                                 image_references=False if chat else None)
        except ValueError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt") from None
        if not ids:
            raise APIError(400, "the prompt is empty: nothing to continue", param="messages" if chat else "prompt")
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > settings.max_tokens_cap:
            raise APIError(400, f"max_tokens={asked} is more than this server's cap of {settings.max_tokens_cap}",
                           param="max_tokens")
        max_tokens = asked if asked is not None else settings.max_tokens_cap
        if positions is not None:
            if len(ids) >= positions:
                raise APIError(400, f"the prompt takes {len(ids)} tokens and the model has {positions} positions",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
            if asked is not None and len(ids) + asked > positions:
                raise APIError(400, f"the prompt's {len(ids)} tokens + max_tokens={asked} exceed the model's "
                                    f"{positions} positions", param="max_tokens", code="context_length_exceeded")
            max_tokens = min(max_tokens, positions - len(ids))
        logprobs = req.top_logprobs_asked()
        params = SamplingParams(max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                                n=req.n, stop=req.stops(), seed=req.seed,
                                frequency_penalty=float(req.frequency_penalty or 0),
                                presence_penalty=float(req.presence_penalty or 0), logit_bias=req.biases(vocab),
                                logprobs=logprobs, echo_logprobs=bool(getattr(req, "echo", False))
                                and logprobs is not None)
        if params.n > engine.max_batch:
            raise APIError(400, f"n={params.n} is more than the server's batch of {engine.max_batch}", param="n")
        batch = processor.batch_media([media])
        images = batch["images"]
        if images is not None:
            images = images.to(next(model.vision.parameters()).dtype)
        return Job(torch.tensor(ids, dtype=torch.long), {**batch, "images": images}, params, emit=lambda e: None,
                   strip_leading_whitespace=chat)

    async def run(request: Request, job: Job, chat: bool, stream: bool, include_usage: bool,
                  echo: Optional[str] = None) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server stopped)
                job.cancelled.set()

        job.emit = emit
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except NotAccepting as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id, "created": created, "model": settings.model_name}
        answer = _Answer(strings, job, chat, echo)
        if stream:
            return StreamingResponse(_sse(events, answer, head, kind, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = [answer.echo_text] * job.params.n
        reasons: list[Optional[str]] = [None] * job.params.n
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return Response(status_code=499)
                continue
            if event.kind == "prompt":
                answer.prompt(event)
            elif event.kind == "delta":
                texts[event.choice] += event.text
                answer.token(event)
            elif event.kind == "finish":
                reasons[event.choice] = event.finish_reason
            elif event.kind == "error":
                raise APIError(500, event.message, type="server_error")
            elif event.kind == "done":
                break
        choices = [({"index": i, "message": {"role": "assistant", "content": t}} if chat else {"index": i, "text": t})
                   | {"finish_reason": r, "logprobs": answer.logprobs(i)}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({**head, "object": kind, "choices": choices, "usage": event.usage})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse(ChatCompletionRequest, await read_json(request))
        text, refs = chat_prompt(req.messages)
        job = await run_in_threadpool(prepare, text, refs, req, True)
        return await run(request, job, True, req.stream, bool(req.stream_options and req.stream_options.include_usage))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse(CompletionRequest, await read_json(request))
        refs = [MediaRef(url, video=False) for url in req.media]
        job = await run_in_threadpool(prepare, req.prompt, refs, req, False)
        return await run(request, job, False, req.stream, bool(req.stream_options and req.stream_options.include_usage),
                         echo=req.prompt if req.echo else None)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "flamingo",
                "max_model_len": positions, "max_tokens_cap": settings.max_tokens_cap,
                "max_images": settings.max_images}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.accepting
        return JSONResponse({"status": "ok" if ok else "shutting down", "running_rows": engine.running_rows},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> PlainTextResponse:
        authorize(request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


class _CountRequests:
    """ASGI middleware: counts the generation endpoints' responses by status (a plain ASGI wrapper, so streamed
    bodies pass through untouched)."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.inc("requests_total", labels={"endpoint": scope["path"],
                                                           "status": str(message["status"])})
            await send(message)

        await self.app(scope, receive, counted)


class _Answer:
    """One request's choices as OpenAI writes them: the echoed prompt (raw completions with `echo`) and, when the
    request asked for logprobs, each choice's `logprobs` object, built from the engine's events."""

    def __init__(self, strings: TokenStrings, job: Job, chat: bool, echo: Optional[str]) -> None:
        self.strings, self.job, self.chat = strings, job, chat
        self.echo_text = echo or ""
        self.asked = job.params.logprobs is not None
        n = job.params.n
        self._chat_tokens: list[list[int]] = [[] for _ in range(n)]
        self._chat_logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        self._completion = [CompletionLogprobs(strings) for _ in range(n)]
        self._prompt_part: Optional[dict[str, list[Any]]] = None  # the echoed prompt's lists, for a stream

    def prompt(self, event: Event) -> None:
        """The echoed prompt's log-probabilities: its first token has none."""
        ids = self.job.prompt_ids.tolist()
        for c in self._completion:
            first, rest = c.add(ids[:1], None), c.add(ids[1:], event.logprobs)
        self._prompt_part = {k: first[k] + rest[k] for k in first}

    def token(self, event: Event) -> Optional[dict[str, Any]]:
        """Take a delta's token; returns its `logprobs` object for a stream chunk (None when not asked for, or
        for a stop token)."""
        if not self.asked or event.token is None or event.logprobs is None:
            return None
        if self.chat:
            self._chat_tokens[event.choice].append(event.token)
            self._chat_logprobs[event.choice].append(event.logprobs)
            return {"content": chat_entries(self.strings, [event.token], event.logprobs), "refusal": None}
        return self._completion[event.choice].add([event.token], event.logprobs)

    def logprobs(self, choice: int) -> Optional[dict[str, Any]]:
        """A whole choice's `logprobs` object (None when not asked for)."""
        if not self.asked:
            return None
        if self.chat:
            parts = self._chat_logprobs[choice]
            entries = chat_entries(self.strings, self._chat_tokens[choice], TokenLogprobs.cat(parts)) if parts else []
            return {"content": entries, "refusal": None}
        return self._completion[choice].body

    def prompt_chunk(self) -> Optional[dict[str, Any]]:
        """The echoed prompt's `logprobs` lists, for a stream's first chunk of each choice."""
        return self._prompt_part


async def _sse(events: asyncio.Queue, answer: _Answer, head: dict[str, Any], kind: str,
               include_usage: bool) -> AsyncIterator[str]:
    """The job's events as OpenAI stream chunks; the job is cancelled when the client goes away."""
    job, chat = answer.job, answer.chat
    chunk_kind = kind + ".chunk" if chat else kind

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({**head, "object": chunk_kind, "choices": choices, **extra}) + "\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(job.params.n)])
        elif answer.echo_text and not job.params.echo_logprobs:
            yield chunk([{"index": i, "text": answer.echo_text, "finish_reason": None, "logprobs": None}
                         for i in range(job.params.n)])
        while True:
            event = await events.get()
            if event.kind == "prompt":
                answer.prompt(event)
                yield chunk([{"index": i, "text": answer.echo_text, "finish_reason": None,
                              "logprobs": answer.prompt_chunk()} for i in range(job.params.n)])
            elif event.kind == "delta":
                body = {"delta": {"content": event.text}} if chat else {"text": event.text}
                yield chunk([{"index": event.choice, **body, "finish_reason": None, "logprobs": answer.token(event)}])
            elif event.kind == "finish":
                body = {"delta": {}} if chat else {"text": ""}
                yield chunk([{"index": event.choice, **body, "finish_reason": event.finish_reason, "logprobs": None}])
            elif event.kind == "error":
                yield "data: " + json.dumps(APIError(500, event.message, type="server_error").body()) + "\n\n"
                break
            elif event.kind == "done":
                if include_usage:
                    yield chunk([], usage=event.usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op for a finished job; frees the rows of an abandoned one
