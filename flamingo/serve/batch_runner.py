"""The HTTP Batch API's worker: batches run in the background of `flamingo serve`, one at a time, in creation order.

A batch moves through OpenAI's states: `validating` -> `in_progress` -> `finalizing` -> `completed`; `failed` when
validation refuses its input file; `cancelling` -> `cancelled` on a cancel.

- Validation, as OpenAI's: an input file with no request (`empty_file`), with more than 50,000 (`too_many_tasks`),
  with lines whose `url` is not the batch's endpoint (`url_mismatch`) or whose `body.model` is not the model the
  first line naming one names (`model_mismatch`: a batch runs one model; a line naming none is fine, since the
  server's endpoints take requests without one) fails the batch with `errors.data`, one error per line at fault,
  the first 100 listed. Any other bad line (not JSON, a `custom_id` used twice, ...) runs as a failed
  request: it goes to the error file (serve/batch_lines.py).
- Running: the lines go through the server's own app in this process (the checks and answers interactive clients
  get), at most `concurrency` in flight, so the engine keeps room for interactive requests; 429s are retried.
  `request_counts` follow the answers as they come.
- Finalizing: the output file holds the entries answered with status 200, the error file the others (OpenAI's
  split), each only when not empty.
- Cancel: no new line is sent, those in flight finish, and the partial files are written; lines never sent are in
  neither file (`completed + failed < total`). A batch not started yet is cancelled at once.
- Expiry: a batch not done `completion_window` after its creation (24 h) stops sending lines, as on a cancel, and
  ends `expired`: its answers in the output and error files, the lines never sent in the error file with the code
  `batch_expired` (OpenAI's); one whose window passed before it ran has them all so.
- Files: the output and error files live `output_expires_after` seconds when the batch asked so. The runner
  deletes expired files (batch_store.py) when it starts, every `FILE_SWEEP_SECONDS` and before reading an input
  file; the routes do it on every call too.
- Restart: the answers live in memory until finalizing, so a batch the server stopped in the middle of (validating,
  in progress or finalizing) runs again from its first line when a server starts on the same directory; one that
  was cancelling is cancelled without files. A run counts on disk until it ends: a batch whose last
  `MAX_INTERRUPTED_RUNS` runs all died with their process (a crash that one of its lines may cause) is failed
  with a `server_error` instead of crashing every server that starts on the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import IO, Any, Callable, Optional

from starlette.concurrency import run_in_threadpool

from .batch_lines import Answer, Line, app_client, entry, load_json, parse_lines, read_lines, send_all, tokens_of
from .batch_store import BatchStore, Record, new_id

log = logging.getLogger(__name__)

MAX_REQUESTS = 50_000  # OpenAI's limit per batch
COMPLETION_WINDOWS = {"24h": 24 * 3600}  # OpenAI's windows, in seconds: a batch not done by then expires
EXPIRED = {"code": "batch_expired", "message": "This request could not be executed before the completion window "
                                               "expired."}
MAX_LISTED_ERRORS = 100  # url_mismatch and model_mismatch lines listed in errors.data
FILE_SWEEP_SECONDS = 60.0  # how often expired files leave the disk unasked (an access deletes them at once)
ACTIVE = ("validating", "in_progress", "finalizing")
MAX_INTERRUPTED_RUNS = 3  # runs of one batch that died with their process before it is failed, not run again


def validation_errors(raw_lines: list[str], endpoint: str) -> list[dict[str, Any]]:
    """What fails a batch before it runs (OpenAI's codes); [] for a file that runs."""
    requests = [(n, text) for n, text in enumerate(raw_lines, 1) if text.strip()]
    if not requests:
        return [_error("empty_file", "the input file holds no request")]
    if len(requests) > MAX_REQUESTS:
        return [_error("too_many_tasks", f"the input file holds {len(requests)} requests; a batch takes at most "
                                         f"{MAX_REQUESTS}")]
    errors = []
    first_model: Optional[tuple[int, Any]] = None  # (line, model) of the first line that names a model
    for n, text in requests:
        try:
            request = load_json(text)
        except ValueError:
            continue  # a bad line, answered in the error file
        if not isinstance(request, dict):
            continue
        if request.get("url") != endpoint:
            errors.append(_error("url_mismatch", f"the line's url {request.get('url')!r} is not the batch's "
                                                 f"endpoint {endpoint!r}", line=n, param="url"))
        body = request.get("body")
        model = body.get("model") if isinstance(body, dict) else None
        if model is None:
            continue
        if first_model is None:
            first_model = (n, model)
        elif model != first_model[1]:
            errors.append(_error("model_mismatch", f"the line's model {model!r} is not {first_model[1]!r}, the "
                                                   f"model of line {first_model[0]}: a batch runs one model",
                                 line=n, param="body.model"))
    return errors[:MAX_LISTED_ERRORS]


def _error(code: str, message: str, line: Optional[int] = None, param: Optional[str] = None) -> dict[str, Any]:
    return {"code": code, "message": message, "line": line, "param": param}


def _now() -> int:
    return int(time.time())


class BatchRunner:
    def __init__(self, store: BatchStore, app: Any, api_key: Optional[str], concurrency: int,
                 accepting: Callable[[], bool]) -> None:
        """app: the server's ASGI app, which answers the lines; accepting: False once the server is stopping."""
        self.store, self.app, self.api_key = store, app, api_key
        self.concurrency, self.accepting = concurrency, accepting
        self.running: Optional[str] = None  # the batch the worker holds
        self._stop = asyncio.Event()  # set: the running batch is cancelled (or expired)
        self._expired = False  # the running batch's window has passed
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []  # the worker and the file sweep

    async def start(self) -> None:
        """Queue the batches a previous server left unfinished, then start the worker and the file sweep (whose first
        pass deletes the files that expired while no server ran)."""
        for record in sorted(self.store.batches.values(), key=lambda r: r.created_ns):
            body = record.body
            if body["status"] == "cancelling":
                body.update(status="cancelled", cancelled_at=_now())
                await self.store.save_batch(record)
            elif body["status"] in ACTIVE and record.interrupted_runs >= MAX_INTERRUPTED_RUNS:
                log.error("batch %s: the server died in each of its last %d runs; it is failed, not run again",
                          body["id"], record.interrupted_runs)
                body.update(status="failed", failed_at=_now(), errors={"object": "list", "data": [_error(
                    "server_error", f"the server stopped abnormally during each of this batch's last "
                                    f"{record.interrupted_runs} runs (see its log): the batch is not run again")]})
                await self.store.save_batch(record)
            elif body["status"] in ACTIVE:
                log.info("batch %s was %s when the server stopped: it runs again", body["id"], body["status"])
                self.submit(record)
        self._tasks = [asyncio.create_task(self._work()), asyncio.create_task(self._sweep())]

    async def close(self) -> None:
        """Stop the worker and the sweep; a batch the worker held stays active on disk (it runs again on the next
        start)."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sweep(self) -> None:
        while True:
            try:
                await self.store.expire_files()
            except OSError:  # a disk error must not end the sweep: the next pass tries again
                log.exception("deleting expired files failed")
            await asyncio.sleep(FILE_SWEEP_SECONDS)

    def submit(self, record: Record) -> None:
        self._queue.put_nowait(record.body["id"])

    async def cancel(self, record: Record) -> None:
        """Cancel an active batch: the running one stops sending lines, a queued one is cancelled now."""
        body, now = record.body, _now()
        if body["id"] == self.running:
            body.update(status="cancelling", cancelling_at=now)
            self._stop.set()
        else:
            body.update(status="cancelled", cancelling_at=now, cancelled_at=now)
        await self.store.save_batch(record)

    async def _work(self) -> None:
        while True:
            record = self.store.batches.get(await self._queue.get())
            if record is None or record.body["status"] not in ACTIVE:  # cancelled while queued
                continue
            self.running, self._stop, self._expired = record.body["id"], asyncio.Event(), False
            record.interrupted_runs += 1  # until the run ends: a process that dies in it leaves it counted
            await self._save(record)
            try:
                await self._run(record)
            except Exception as e:  # a batch that cannot run must not stop the ones after it
                log.exception("batch %s failed", record.body["id"])
                record.body.update(status="failed", failed_at=_now(),
                                   errors={"object": "list", "data": [_error("server_error", f"{type(e).__name__}: "
                                                                                             f"{e}")]})
            finally:  # ended, cancelled by the server's stop included
                self.running = None
                record.interrupted_runs = 0
                await self._save(record)

    async def _save(self, record: Record) -> None:
        """The worker's writes of a batch's record: one that fails (a full disk) is logged and the worker goes on
        with the next batch; the record on disk stays as it was (an active one runs again on the next start)."""
        try:
            await self.store.save_batch(record)
        except OSError:
            log.exception("writing batch %s's record failed", record.body["id"])

    async def _run(self, record: Record) -> None:
        body = record.body
        await self.store.expire_files()
        missing = _error("file_not_found", f"the input file {body['input_file_id']!r} was deleted or expired",
                         param="input_file_id")
        raw = None
        if body["input_file_id"] in self.store.files:
            try:  # the file may expire (or be deleted) while it is read
                raw = await run_in_threadpool(read_lines, self.store.content_path(body["input_file_id"]))
            except FileNotFoundError:
                pass
        errors = [missing] if raw is None else validation_errors(raw, body["endpoint"])
        if errors:
            if self._stop.is_set():  # cancelled while validating: `cancelling` ends `cancelled` (OpenAI's), no files
                body.update(status="cancelled", cancelled_at=_now())
            else:
                body.update(status="failed", failed_at=_now(), errors={"object": "list", "data": errors})
            await self.store.save_batch(record)
            return
        lines = parse_lines(raw)
        counts = {"total": len(lines), "completed": 0, "failed": sum(line.request is None for line in lines)}
        left = record.created_ns / 1e9 + COMPLETION_WINDOWS[body["completion_window"]] - time.time()
        if left <= 0:
            self._expire()
        if not self._stop.is_set():
            body.update(status="in_progress", in_progress_at=body.get("in_progress_at") or _now())
        body["request_counts"] = counts
        await self.store.save_batch(record)

        def counted(k: int, answer: Answer) -> None:
            if not self.accepting():  # stopping: no more lines are sent, and its refusals (503) are no answers
                self._stop.set()  # the batch is not finalized and runs again on the next start
                return
            counts["completed" if answer[0] == 200 else "failed"] += 1

        watchdog = asyncio.get_running_loop().call_later(max(left, 0.0), self._expire)
        try:
            async with app_client(self.app, self.api_key) as client:
                answers = await send_all(client, lines, self.concurrency, stop=self._stop, on_answer=counted,
                                         batch=body["id"])
        finally:
            watchdog.cancel()
        if not self.accepting():  # the server is stopping: its refusals are no answers; run again next start
            return
        await self._finalize(record, lines, answers)

    def _expire(self) -> None:
        self._expired = True
        self._stop.set()

    async def _finalize(self, record: Record, lines: list[Line], answers: list[Optional[Answer]]) -> None:
        body, expired = record.body, self._expired
        cancelled = self._stop.is_set() and not expired
        if not cancelled:
            body.update(status="finalizing", finalizing_at=_now())
            await self.store.save_batch(record)
        succeeded: list[str] = []
        refused: list[str] = []
        prompt = completion = cached = 0
        for line, answer in zip(lines, answers):
            if line.request is not None and answer is None:  # never sent: the batch was cancelled or expired first
                if expired:
                    refused.append(json.dumps({**entry(line, None), "error": EXPIRED}) + "\n")
                    body["request_counts"]["failed"] += 1
                continue
            (succeeded if answer is not None and answer[0] == 200 else refused).append(
                json.dumps(entry(line, answer)) + "\n")
            if answer is not None and answer[0] == 200:
                p, c, h = tokens_of(answer[1])
                prompt, completion, cached = prompt + p, completion + c, cached + h
        lifetime = record.output_expires_after
        body["output_file_id"] = await self._write_file(body["id"] + "_output.jsonl", succeeded, lifetime)
        body["error_file_id"] = await self._write_file(body["id"] + "_error.jsonl", refused, lifetime)
        body["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                         "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": prompt + completion}
        if expired:
            body.update(status="expired", expired_at=_now())
        elif cancelled:
            body.update(status="cancelled", cancelled_at=_now())
        else:
            body.update(status="completed", completed_at=_now())
        await self.store.save_batch(record)

    async def _write_file(self, filename: str, entries: list[str], expires_after: Optional[int]) -> Optional[str]:
        """A batch_output file of `entries` living `expires_after` seconds (None: until deleted); its id (None when
        there is none to write)."""
        if not entries:
            return None
        file_id = new_id("file-")

        def fill(f: IO[bytes]) -> None:
            f.writelines(e.encode("utf-8") for e in entries)

        size = await run_in_threadpool(self.store.write_content, file_id, fill)
        return (await self.store.add_file(file_id, size, filename, "batch_output", expires_after)).body["id"]
