"""The HTTP side of `flamingo serve`: FastAPI routes, request checks, streaming, OpenAI-style errors.

Every check happens here, before any model work: body size, JSON, field types, the API key, media (count, policy,
pixels), prompt length against the LM's positions, `max_tokens` against the cap. A request that passes becomes an
engine `Job`; its events come back through an asyncio queue and go out as one JSON body or as server-sent events
(`data: {...}` chunks, then `data: [DONE]`; the Responses API's typed events, serve/openai_responses.py), with
OpenAI's `logprobs` objects when asked for (serve/logprobs.py) and, for raw completions with `echo`, the prompt before
the answer. A client that disconnects cancels its job (its rows
leave at the next decode step).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..chat import chat_format_for, control_tokens
from ..model.backbones import lm_max_positions
from ..references import DECLARATION, resolve_declarations
from .batch_store import check_batch_dir
from .batches import mount_batch_api
from .engine import Engine, Event, Job, NotAccepting, QueueFull
from .logprobs import TokenStrings
from .media import MediaPolicy, load_medium
from .middleware import (
    REQUEST_ID,
    BodyTimeout,
    BrowserGuard,
    ConnectionLimit,
    CountRequests,
    OpenConnections,
    RelativeRedirects,
    RequestIds,
    current_request_id,
)
from .openai_responses import ResponseWriter, status_of, stream_response
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
    final_answer_headers,
    parse,
    refuse_encoded_body,
)
from .responses import Answer, stream, whole
from .sampling import SamplingParams
from .structured import GrammarError, Grammars
from .template import MediaRef, render_messages

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)
# a /v1/responses request runs as a chat completion: the chat fields its errors name, as the Responses API calls them
RESPONSES_FIELDS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}


# a stream's headers: no cache, and no proxy buffering (nginx holds a proxied answer back until it ends otherwise)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServeSettings:
    """The operator's limits (the `flamingo serve` options)."""

    model_name: str = "flamingo"
    # when set, every route but the page (`/`, `/static`) and `/health` needs `Authorization: Bearer <key>`
    api_key: Optional[str] = None
    max_body_bytes: int = 20 * 2**20
    max_tokens_cap: int = 512  # the most `max_tokens` a request may ask for (and the default, within positions)
    max_images: int = 32  # media parts per prompt
    media: MediaPolicy = field(default_factory=MediaPolicy)
    batch_dir: Optional[str] = None  # the Files and Batch APIs' storage (serve/batches.py); None: those routes 404
    batch_concurrency: Optional[int] = None  # a batch's requests in flight (default: the engine's batch)
    max_batch_file_bytes: int = 200 * 2**20  # an uploaded file's limit (OpenAI's)
    # the Host names answered (middleware.BrowserGuard); None: any. `flamingo serve` on loopback: loopback names only
    allowed_hosts: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        """Refuse options under which the server would start but never answer, or without the authentication asked
        for (an empty key would let in every request without one; checked before the app exists)."""
        if self.api_key is not None and (not self.api_key.strip() or self.api_key != self.api_key.strip()):
            raise ValueError("the API key (--api-key) is empty or starts or ends with spaces (which no HTTP header "
                             "keeps): give the key, or none (None) to serve without authentication")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            raise ValueError("the API key (--api-key) holds characters that are not printable ASCII: HTTP clients "
                             "send a key as ASCII (the openai client refuses any other), so no request could give "
                             "it; choose a key of printable ASCII characters")
        if self.batch_concurrency is not None and self.batch_concurrency < 1:
            raise ValueError(f"batch concurrency must be >= 1 (or unset: the engine's batch), got "
                             f"{self.batch_concurrency}")
        if self.batch_dir is not None:
            check_batch_dir(self.batch_dir)


def create_app(engine: Engine, settings: ServeSettings, connections: Optional[OpenConnections] = None,
               body_timeout: Optional[float] = None) -> FastAPI:
    """The app around a started (or to-be-started) engine; the lifespan stops the engine when the server ends.
    connections: the server's connection count, which `--max-connections` may bound (server.uvicorn_config);
    body_timeout: seconds a request's body may stop arriving before a 408 (`--keep-alive`; None: untimed)."""
    processor, model = engine.processor, engine.model
    # the context a prompt and its answer share: the LM's positions, or the processor's `max_length` where shorter
    # (a tokenizer's model_max_length), the limit `generate` and eval hold prompts to; None: neither sets one
    limits = [n for n in (lm_max_positions(model.lm), processor.max_length) if n is not None]
    positions = min(limits) if limits else None
    vocab = model.lm.get_output_embeddings().weight.shape[0]  # logits per position
    metrics = engine.metrics
    strings = TokenStrings(processor.tokenizer, processor.hidden_ids)
    grammars = Grammars(processor.tokenizer, vocab, sorted(engine.eos))
    chat_template = chat_format_for(processor, vocab)  # the served model's conversation format
    control = control_tokens(processor)  # strings chat text may not hold (they would tokenize as control tokens)
    bos_told = [False]  # whether the log has said once that a text prompt scored with echo got a BOS added

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if batches is not None:
            await batches.start()
        yield
        if batches is not None:  # before the engine stops: its refusals would read as the batch's answers
            await batches.close()
        await run_in_threadpool(engine.stop, 0.0)  # uvicorn has let in-flight requests finish (its grace period)

    app = FastAPI(title="flamingo serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.response_headers())

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect) -> Response:
        """The client left while its body was being read: nobody reads the answer, and it is no server error."""
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # its headers kept: a 405's `Allow` (RFC 9110)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=final_answer_headers(e.status_code) | (e.headers or {}))

    app.add_middleware(BodyTimeout, seconds=body_timeout)  # the innermost: its 408 is an APIError of the route's
    app.add_middleware(RelativeRedirects)
    app.add_middleware(BrowserGuard, allowed_hosts=settings.allowed_hosts)  # refuses before any work
    app.add_middleware(ConnectionLimit, connections=connections)  # refuses before any work
    app.add_middleware(CountRequests, metrics=metrics)  # outside the guard and the limit: counts their refusals too
    # the outermost (the last added): its id on every response; answers (and logs) an exception from within
    app.add_middleware(RequestIds)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        # none is read as JSON, as FastAPI does, but not from a web page (its Origin): a `no-cors` fetch of a Blob
        # sends none, to a LAN address without Sec-Fetch-Site
        if (kind or request.headers.get("origin")) and kind != "application/json" and \
                not (kind.startswith("application/") and kind.endswith("+json")):
            # as FastAPI's own JSON bodies: a form's or text/plain body is what a cross-site page can send unasked
            raise APIError(415, f"the body is sent as {kind!r}: send JSON with `Content-Type: application/json`",
                           code="unsupported_media_type")
        refuse_encoded_body(request.headers)
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
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply to read") from None
        check_surrogates(body, payload)
        return payload

    def load_media(refs: list[MediaRef], param: str) -> list[torch.Tensor]:
        """A request's media (given in its field `param`), checked, decoded and preprocessed to pixel values
        `(F, C, H, W)` once for all its prompts (in a worker thread: decoding takes time)."""
        if len(refs) > settings.max_images:
            raise APIError(400, f"{len(refs)} images/videos, more than the {settings.max_images} this server "
                                "accepts per prompt", param=param)
        if model.references is not None and len(refs) > model.references[1]:
            raise APIError(400, f"{len(refs)} images, more than the model's {model.references[1]} reference tokens",
                           param=param)
        pixels = []
        for i, r in enumerate(refs):
            frames = load_medium(r.url, settings.media, video=r.video, fps=processor.video_fps,
                                 max_frames=processor.max_frames, where=f"medium {i}", param=param)
            try:
                pixels.append(processor.preprocess_media(frames))  # (F, C, H, W)
            except ValueError as e:  # the processor's checks (image size and mode)
                raise APIError(400, f"medium {i}: {e}", param=param) from None
        return pixels

    def response_grammar(req: Any) -> Any:
        """The request's `response_format`, compiled once for all its prompts (None: free text)."""
        try:
            return grammars.compile(req.response_format.spec() if req.response_format is not None else None)
        except GrammarError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from None

    def prepare(prompt: Union[str, list[int]], frames: list[torch.Tensor], req: Any, chat: bool,
                grammar: Any, param: str = "prompt") -> Job:
        """A prompt (the request's field `param`), its preprocessed media, the request's limits and compiled format
        -> a Job. A prompt is text, or token ids (the completions API's; their `<image>` ids must match the media).
        chat: a conversation's answer (sent without its leading spaces and tabs, the gap the format puts back; the chat
        template's stop strings, unless a format's grammar decides where the answer ends: they could cut valid JSON,
        e.g. mmgpt's `### End.` inside a string; the request's own `stop` applies either way, as OpenAI's does)."""
        try:
            if isinstance(prompt, str):
                ids, media = processor.encode_prompt(prompt, frames, max_length=2**62,
                                                     image_references=False if chat else None)
            else:
                ids, media = prompt, frames
                if ids.count(processor.media_token_id) != len(media):
                    raise ValueError(f"the prompt's ids hold {ids.count(processor.media_token_id)} <image> token(s) "
                                     f"(id {processor.media_token_id}) but {len(media)} media were given")
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None
        if not ids:
            raise APIError(400, "the prompt is empty: nothing to continue", param=param)
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"  # as sent
        if asked is not None and asked > settings.max_tokens_cap:
            raise APIError(400, f"{field}={asked} is more than this server's cap of {settings.max_tokens_cap}",
                           param=field)
        max_tokens = asked if asked is not None else settings.max_tokens_cap
        if positions is not None:
            if len(ids) > positions or (len(ids) == positions and max_tokens != 0):  # echo alone: no new token
                # OpenAI's wording first: clients that map errors by their text (litellm) know it; the page knows
                # the end ("positions")
                raise APIError(400, f"This model's maximum context length is {positions} tokens, and the prompt "
                                    f"takes {len(ids)} of its {positions} positions", param=param,
                               code="context_length_exceeded")
            if asked is not None and len(ids) + asked > positions:
                raise APIError(400, f"This model's maximum context length is {positions} tokens, and the prompt's "
                                    f"{len(ids)} tokens + {field}={asked} exceed its {positions} positions",
                               param=field, code="context_length_exceeded")
            max_tokens = min(max_tokens, positions - len(ids))
        logprobs = req.top_logprobs_asked()
        params = SamplingParams(max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                                n=req.n, stop=req.stops() + (chat_template.stops if chat and grammar is None else ()),
                                seed=req.seed,
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
                   strip_leading_whitespace=chat, grammar=grammar, cache_salt=req.cache_salt)

    def submit(request: Request, jobs: list[Job]) -> asyncio.Queue:
        """Queue the request's jobs on the engine; their events arrive on the returned queue, tagged with the job's
        index."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def emitter(k: int, cancelled: threading.Event) -> Any:
            # closes over the job's event, not the job: the job holds its emit, and a cycle through it would keep a
            # finished job (its prompt, its media) until the cyclic collector runs
            def emit(event: Event) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (k, event))
                except RuntimeError:  # the loop is gone (server stopped)
                    cancelled.set()
            return emit

        for k, job in enumerate(jobs):
            job.emit, job.request_id = emitter(k, job.cancelled), request.scope[REQUEST_ID]
        try:
            engine.submit_all(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except NotAccepting as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        return events

    def stream_failed(endpoint: str) -> Callable[[], None]:
        """Counts a stream that ends with an error event: its 200 went out with its first chunk."""
        return lambda: metrics.inc("stream_errors_total", labels={"endpoint": endpoint})

    async def run(request: Request, jobs: list[Job], chat: bool, stream_it: bool, include_usage: bool,
                  echoes: Optional[list[str]] = None) -> Response:
        events = submit(request, jobs)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + jobs[0].id, "created": int(time.time()),
                "model": settings.model_name}
        answers = [Answer(strings, job, chat, echoes[k] if echoes else None, k * job.params.n)
                   for k, job in enumerate(jobs)]
        if stream_it:
            failed = stream_failed("/v1/chat/completions" if chat else "/v1/completions")
            return StreamingResponse(stream(events, answers, head, kind, chat, include_usage, failed),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        result = await whole(events, answers, chat, request.receive)
        if result is None:
            return Response(status_code=499)
        choices, usage = result
        return JSONResponse({**head, "object": kind, "choices": choices, "usage": usage})

    def prepare_chat(req: ChatCompletionRequest, param: str) -> Job:
        """A chat request's job: its messages written in the model's chat format and checked, its media loaded."""
        text, refs = render_messages(chat_template, req.messages, control)
        return prepare(text, load_media(refs, param), req, True, response_grammar(req), param)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse(ChatCompletionRequest, await read_json(request))
        job = await run_in_threadpool(lambda: prepare_chat(req, "messages"))  # off the event loop: a long
        # conversation takes a while to write and check
        return await run(request, [job], True, req.stream,
                         bool(req.stream_options and req.stream_options.include_usage))

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        authorize(request)
        req = parse(ResponsesRequest, await read_json(request))
        try:  # checked as the chat request it becomes: its errors name the Responses fields
            chat = req.chat()
            job = await run_in_threadpool(lambda: prepare_chat(chat, "input"))
        except APIError as e:
            as_responses_error(e, req)
            raise
        events, writer = submit(request, [job]), ResponseWriter(req, settings.model_name, job)
        if req.stream:
            return StreamingResponse(stream_response(events, job, writer, stream_failed("/v1/responses")),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        result = await whole(events, [Answer(strings, job, True, None, 0)], True, request.receive)
        if result is None:
            return Response(status_code=499)
        (choice,), usage = result
        status = status_of(choice["finish_reason"])
        return JSONResponse(writer.body(status, choice["message"]["content"], usage))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse(CompletionRequest, await read_json(request))
        prompts = req.prompts(vocab)
        if len(prompts) > engine.max_queue:
            raise APIError(400, f"{len(prompts)} prompts, more than the server's queue of {engine.max_queue}",
                           param="prompt")
        refs = [MediaRef(url, video=False) for url in req.media]

        def prepare_all() -> list[Job]:  # media and format made once; every prompt of the list gets them
            frames, grammar = load_media(refs, "media"), response_grammar(req)
            return [prepare(p, frames, req, False, grammar) for p in prompts]

        jobs = await run_in_threadpool(prepare_all)
        if req.echo and req.logprobs is not None:
            tell_added_bos(prompts, jobs)
        echoes = [p if isinstance(p, str) else processor.decode(p, skip_special_tokens=False) for p in prompts]
        return await run(request, jobs, False, req.stream,
                         bool(req.stream_options and req.stream_options.include_usage),
                         echoes=echoes if req.echo else None)

    def tell_added_bos(prompts: list[Union[str, list[int]]], jobs: list[Job]) -> None:
        """Log once that an `echo` request with `logprobs` sent a text prompt the tokenizer put its BOS before: the
        log-probabilities list BOS first, so a client that counts the text's tokens without it (lm-evaluation-harness
        with `tokenized_requests=False`) reads every one a token late (docs/serve.md, lm-evaluation-harness)."""
        bos, bos_id = processor.tokenizer.bos_token, processor.tokenizer.bos_token_id
        if bos_told[0] or bos is None:
            return
        for prompt, job in zip(prompts, jobs):
            if isinstance(prompt, str) and not prompt.startswith(bos) and job.prompt_ids[:1].tolist() == [bos_id]:
                bos_told[0] = True
                log.warning("request %s: an echo request with logprobs sent its prompt as text, and the tokenizer put "
                            "its BOS %s before it: the log-probabilities list BOS first, so a client that counts the "
                            "text's tokens without it (lm-evaluation-harness with tokenized_requests=False) reads "
                            "each one token late; send token ids (lm-eval's default). Said once.",
                            current_request_id.get(), bos)
                return

    # the media a prompt may hold: the server's limit, and on a model with image references its reference tokens
    max_images = min(settings.max_images, model.references[1]) if model.references is not None else settings.max_images
    card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "flamingo",
            "max_model_len": positions, "max_tokens_cap": settings.max_tokens_cap, "max_images": max_images,
            "max_queue": engine.max_queue, "chat_template": chat_template.name}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str, request: Request) -> JSONResponse:
        authorize(request)
        if model_id != settings.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist (this server serves {settings.model_name!r})",
                           code="model_not_found")
        return JSONResponse(card)

    # vLLM's tokenizer endpoints: clients count tokens, and lm-evaluation-harness tokenizes through the server
    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        authorize(request)
        req = parse(TokenizeRequest, await read_json(request))
        text = req.prompt if req.messages is None else \
            (await run_in_threadpool(render_messages, chat_template, req.messages, control))[0]
        # a raw prompt that declares its images, read as completions read it with its media (`encode_prompt`): by a
        # processor saved to read declarations, or one that places no <image> and declares some; the media are not
        # sent here, so without the setting a prompt whose declarations do not resolve is read as written, as its
        # completion without media is
        if req.messages is None and (processor.image_references or processor.declares_media(text)):
            try:  # resolve it: one medium per declaration
                text = resolve_declarations(text, len(DECLARATION.findall(text)), processor.num_references)
            except ValueError as e:
                if processor.image_references:
                    raise APIError(400, str(e), param="prompt") from None
        ids = processor.prompt_ids(text) if req.add_special_tokens else processor.token_ids(text, special_tokens=False)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": positions})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        authorize(request)
        req = parse(DetokenizeRequest, await read_json(request))
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": processor.decode(req.tokens, skip_special_tokens=False)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        authorize(request)
        tok = processor.tokenizer
        return JSONResponse({"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token,
                             "bos_token": tok.bos_token, "pad_token": tok.pad_token, "vocab_size": vocab,
                             "model_max_length": positions, "media_token": "<image>",
                             "media_token_id": processor.media_token_id})

    batches = mount_batch_api(app, engine, settings.batch_dir, api_key=settings.api_key,
                              concurrency=settings.batch_concurrency, max_file_bytes=settings.max_batch_file_bytes,
                              model_name=settings.model_name, authorize=authorize, read_json=read_json)

    # GET and HEAD (a load balancer's or a container's health check: `wget --spider`, `curl -I`)
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        ok = engine.accepting
        return JSONResponse({"status": "ok" if ok else "shutting down", "running_rows": engine.running_rows},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> PlainTextResponse:
        authorize(request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.api_route("/", methods=["GET", "HEAD"])
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


def check_surrogates(body: bytes, payload: Any) -> None:
    """Refuse a body whose strings hold a lone UTF-16 surrogate (JSON's `"\\ud800"`: a JavaScript string cut in
    the middle of an emoji is sent so): it is no character, and tokenizers fail on it. Only a body that may hold one
    is walked: a UTF-8 one with a `\\ud8..`-`\\udf..` escape, or with a surrogate's 3 bytes (which `json.loads`
    decodes), and any UTF-16 or UTF-32 one (`json.loads` reads those too; the search is for UTF-8 bytes)."""
    utf8 = json.detect_encoding(body) in ("utf-8", "utf-8-sig")
    if utf8 and not re.search(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]", body):
        return
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the body holds a lone UTF-16 surrogate (\\ud800 to \\udfff), which is no character: "
                            "was a string cut in the middle of a character?") from None


def as_responses_error(e: APIError, req: ResponsesRequest) -> None:
    """A chat request's error as the Responses request it came from: the chat fields as the Responses API names
    them, and `messages[k]` as the input item it was (`instructions` come first as messages[0] when given)."""
    offset = 1 if req.instructions else 0  # as ResponsesRequest.chat() puts them

    def item(m: re.Match) -> str:
        k = int(m.group(1)) - offset
        if k < 0:
            return "instructions"
        return "input" if isinstance(req.input, str) else f"input[{k}]"

    e.message = re.sub(r"messages\[(\d+)\]", item, e.message)
    if e.param == "messages" and e.message.startswith("instructions"):
        e.param = "instructions"
    name = RESPONSES_FIELDS.get(e.param or "")
    if name is not None:
        e.message, e.param = e.message.replace(e.param, name), name
