"""OpenAI's Files and Batch APIs over HTTP (docs/serve.md, "Batch API over HTTP"): what the `openai` client's
`files.*` and `batches.*` calls expect, on `flamingo serve --batch-dir DIR`.

    POST /v1/files (multipart: file, purpose=batch, expires_after[anchor], expires_after[seconds])
    GET /v1/files   GET|DELETE /v1/files/{id}   GET /v1/files/{id}/content
    POST /v1/batches (input_file_id, endpoint, completion_window, metadata, output_expires_after)
    GET /v1/batches   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

Every route checks the API key first, then deletes the files whose `expires_at` has come (batch_store.py), so an
expired file is 404 from that second on. A server without `--batch-dir` answers each with a 404 that says so. Lists
are OpenAI's: newest first (files: `order=asc` for oldest first), `limit` objects after the id `after` (a file
deleted or expired since: after its place), `has_more`.
Storage: serve/batch_store.py; running: serve/batch_runner.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .batch_lines import URLS
from .batch_runner import COMPLETION_WINDOWS, BatchRunner
from .batch_store import BatchStore, Record, new_id, page
from .engine import Engine
from .protocol import APIError, StrictModel, parse, refuse_encoded_body

CONTENT_CHUNK = 1 << 20  # bytes per read when a file's content is sent
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's metadata limits
EXPIRY_SECONDS = (3600, 30 * 24 * 3600)  # OpenAI's range of a file's lifetime: 1 hour to 30 days
UPLOAD_FIELDS = ("file", "purpose", "expires_after[anchor]", "expires_after[seconds]")  # the openai client's names


def storage_error(e: OSError, what: str) -> Exception:
    """A failed write of the store as the answer's error: a full disk is a 507 the client may retry later; any other
    OSError stays itself (a 500)."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return e
    return APIError(507, f"the server's disk is full: {what}; try again later", code="insufficient_storage")


def attachment(filename: str) -> str:
    """The `Content-Disposition` of a download named `filename` (any script): its UTF-8 name in `filename*` (RFC
    6266, 5987), which user agents read, and a printable-ASCII one in `filename` for those that do not."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    if plain == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"


def expiry_seconds(anchor: Any, seconds: Any, param: str) -> int:
    """OpenAI's expiry policy `{anchor: "created_at", seconds: N}` -> N, or a 400 naming the part at fault."""
    if anchor != "created_at":
        raise APIError(400, f"{param}.anchor must be 'created_at', got {anchor!r}", param=f"{param}.anchor")
    low, high = EXPIRY_SECONDS
    if type(seconds) is not int or not low <= seconds <= high:
        raise APIError(400, f"{param}.seconds must be an integer from {low} to {high}, got {seconds!r}",
                       param=f"{param}.seconds")
    return seconds


class ExpiresAfter(StrictModel):
    anchor: StrictStr
    seconds: StrictInt


class BatchCreateRequest(StrictModel):
    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: Optional[dict[StrictStr, StrictStr]] = None
    output_expires_after: Optional[ExpiresAfter] = None  # the lifetime of the batch's output and error files

    def check(self) -> None:
        if self.endpoint not in URLS:
            raise APIError(400, f"endpoint must be one of {list(URLS)}, got {self.endpoint!r}", param="endpoint")
        if self.completion_window not in COMPLETION_WINDOWS:
            raise APIError(400, f"completion_window must be one of {list(COMPLETION_WINDOWS)}, got "
                                f"{self.completion_window!r}", param="completion_window")
        pairs = self.metadata or {}
        if len(pairs) > METADATA_PAIRS or any(len(k) > METADATA_KEY_CHARS or len(v) > METADATA_VALUE_CHARS
                                              for k, v in pairs.items()):
            raise APIError(400, f"metadata takes at most {METADATA_PAIRS} pairs, keys of at most "
                                f"{METADATA_KEY_CHARS} characters, values of at most {METADATA_VALUE_CHARS}",
                           param="metadata")
        if self.output_expires_after is not None:
            expiry_seconds(self.output_expires_after.anchor, self.output_expires_after.seconds,
                           "output_expires_after")


def _limit(request: Request, default: int, most: int) -> int:
    given = request.query_params.get("limit")
    if given is None:
        return default
    if not given.isdigit() or not 1 <= int(given) <= most:
        raise APIError(400, f"limit must be an integer from 1 to {most}, got {given!r}", param="limit")
    return int(given)


def _listing(request: Request, records: dict[str, Record], default: int, most: int, newest_first: bool = True,
             places: Optional[Callable[[str], Optional[int]]] = None) -> JSONResponse:
    """A page of `records`; places: the created_ns of an id `after` may name beyond them (a deleted file's)."""
    after = request.query_params.get("after")
    cursor = None
    if after is not None:
        created_ns = records[after].created_ns if after in records else places(after) if places else None
        if created_ns is None:
            raise APIError(400, f"after: no object {after!r} to list after", param="after")
        cursor = (created_ns, after)
    return JSONResponse(page(records, _limit(request, default, most), cursor, newest_first))


# what a multipart body holds beside its file (boundaries, part headers, the other fields): a file of exactly the
# limit is taken
MULTIPART_ALLOWANCE = 64 * 1024


async def _read_upload(request: Request, limit: int) -> tuple[UploadFile, str, Optional[int]]:
    """A multipart upload's `file`, `purpose` and `expires_after` seconds (None: none asked), the file at most
    `limit` bytes (the body at most that and `MULTIPART_ALLOWANCE`)."""
    too_big = APIError(413, f"the file is larger than the server's limit of {limit} bytes (--max-batch-file-mb)",
                       code="file_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + MULTIPART_ALLOWANCE:
        raise too_big
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "a file is uploaded as multipart/form-data (fields `file` and `purpose`)")
    refuse_encoded_body(request.headers)

    async def counted() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_ALLOWANCE:
                raise too_big
            yield chunk

    try:
        form = await MultiPartParser(request.headers, counted(), max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise APIError(400, f"the upload is not valid multipart/form-data: {e.message}") from None
    try:
        fields = _upload_fields(form)
        if fields[0].size is not None and fields[0].size > limit:
            raise too_big
        return fields
    except APIError:
        await form.close()
        raise


def _upload_fields(form: FormData) -> tuple[UploadFile, str, Optional[int]]:
    """The fields of an upload's form, as `_read_upload` returns them."""
    unknown = [k for k in form.keys() if k not in UPLOAD_FIELDS]
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "the upload has no `file` part", param="file")
    if purpose != "batch":
        raise APIError(400, f"purpose must be 'batch' (the only purpose this server takes), got {purpose!r}",
                       param="purpose")
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return upload, purpose, None
    if isinstance(seconds, str) and re.fullmatch("[0-9]{1,9}", seconds):  # a form sends the number as text
        seconds = int(seconds)
    return upload, purpose, expiry_seconds(anchor, seconds, "expires_after")


def mount_batch_api(app: FastAPI, engine: Engine, batch_dir: Optional[str], *, api_key: Optional[str],
                    concurrency: Optional[int], max_file_bytes: int, model_name: str,
                    authorize: Callable[[Request], None],
                    read_json: Callable[[Request], Awaitable[Any]]) -> Optional[BatchRunner]:
    """Add the Files and Batch routes to `app`; the runner whose start/close the app's lifespan calls (None when the
    server has no batch directory). concurrency: a batch's requests in flight (default: the engine's batch)."""
    store = BatchStore(batch_dir) if batch_dir else None
    runner = None if store is None else BatchRunner(store, app, api_key,
                                                    engine.max_batch if concurrency is None else concurrency,
                                                    lambda: engine.accepting)

    async def stored(request: Request) -> BatchStore:
        authorize(request)
        if store is None:
            raise APIError(404, "this server keeps no files or batches: start `flamingo serve` with --batch-dir DIR",
                           code="batch_api_disabled")
        await store.expire_files()
        return store

    def file_record(s: BatchStore, file_id: str) -> Record:
        if file_id not in s.files:
            raise APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return s.files[file_id]

    def batch_record(s: BatchStore, batch_id: str) -> Record:
        if batch_id not in s.batches:
            raise APIError(404, f"No such Batch object: {batch_id}", param="id", code="batch_not_found")
        return s.batches[batch_id]

    @app.post("/v1/files")
    async def upload_file(request: Request) -> JSONResponse:
        s = await stored(request)
        upload, purpose, expires_after = await _read_upload(request, max_file_bytes)
        file_id = new_id("file-")
        try:
            size = await run_in_threadpool(s.write_content, file_id, lambda f: shutil.copyfileobj(upload.file, f))
            record = await s.add_file(file_id, size, upload.filename or "upload.jsonl", purpose, expires_after)
        except OSError as e:
            with contextlib.suppress(OSError):  # no content left behind without its object
                os.remove(s.content_path(file_id))
            raise storage_error(e, "the file was not stored") from None
        finally:
            await upload.close()
        return JSONResponse(record.body)

    @app.get("/v1/files")
    async def list_files(request: Request) -> JSONResponse:
        s = await stored(request)
        order, purpose = request.query_params.get("order", "desc"), request.query_params.get("purpose")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        files = {k: r for k, r in s.files.items() if purpose is None or r.body["purpose"] == purpose}
        def place(file_id: str) -> Optional[int]:  # a file of another purpose, or one deleted or expired
            record = s.files.get(file_id)
            return record.created_ns if record is not None else s.gone_files.get(file_id)

        return _listing(request, files, 10_000, 10_000, newest_first=order == "desc", places=place)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, request: Request) -> JSONResponse:
        return JSONResponse(file_record(await stored(request), file_id).body)

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> JSONResponse:
        s = await stored(request)
        file_record(s, file_id)
        await s.delete_file(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> StreamingResponse:
        s = await stored(request)
        record = file_record(s, file_id)
        try:  # opened here: the open file outlives an expiry or a delete while it is sent
            handle = open(s.content_path(file_id), "rb")
        except FileNotFoundError:
            raise APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found") from None

        def chunks() -> Iterator[bytes]:
            with handle:
                yield from iter(lambda: handle.read(CONTENT_CHUNK), b"")

        size = os.fstat(handle.fileno()).st_size
        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"content-length": str(size),
                                          "content-disposition": attachment(record.body["filename"])})

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> JSONResponse:
        s = await stored(request)
        req = parse(BatchCreateRequest, await read_json(request))
        source = file_record(s, req.input_file_id)
        if source.body["purpose"] != "batch":
            raise APIError(400, f"the input file {req.input_file_id!r} has purpose {source.body['purpose']!r}, "
                                "not 'batch'", param="input_file_id")
        timestamps = dict.fromkeys(("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                                    "cancelling_at", "cancelled_at"))
        batch_id = new_id("batch_")
        try:
            record = await s.add_batch({
                "id": batch_id, "object": "batch", "endpoint": req.endpoint, "model": model_name, "errors": None,
                "input_file_id": req.input_file_id, "completion_window": req.completion_window,
                "status": "validating", "output_file_id": None, "error_file_id": None, **timestamps,
                "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": req.metadata,
                "usage": None}, COMPLETION_WINDOWS[req.completion_window],
                output_expires_after=None if req.output_expires_after is None else req.output_expires_after.seconds)
        except OSError as e:
            await s.drop_batch(batch_id)  # no batch listed that never runs
            raise storage_error(e, "the batch was not created") from None
        assert runner is not None  # a store comes with its runner
        runner.submit(record)
        return JSONResponse(record.body)

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> JSONResponse:
        return _listing(request, (await stored(request)).batches, 20, 100)

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, request: Request) -> JSONResponse:
        return JSONResponse(batch_record(await stored(request), batch_id).body)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
        record = batch_record(await stored(request), batch_id)
        status = record.body["status"]
        if status in ("validating", "in_progress"):
            assert runner is not None
            await runner.cancel(record)
        elif status not in ("cancelling", "cancelled"):
            raise APIError(409, f"a batch that is {status} cannot be cancelled", code="invalid_state")
        return JSONResponse(record.body)

    return runner
