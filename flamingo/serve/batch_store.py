"""The files and batches of the HTTP Batch API, kept in a directory (`flamingo serve --batch-dir DIR`).

    DIR/files/file-<hex>.json        the file object (OpenAI's: id, bytes, created_at, filename, purpose, ...)
    DIR/files/file-<hex>.data        its content
    DIR/batches/batch_<hex>.json     the batch object
    DIR/gone_files.jsonl             the places of deleted and expired files, `{"id", "created_ns"}` a line

Each record is written whole and renamed into place (runtime/checkpoint_io.py), content before its object, so a
record on disk is always complete; a content without its object (a crash between the two) is ignored. A deleted
file's place is appended to `gone_files.jsonl` before its object goes (a line torn by a crash is skipped), and the
log is rewritten whole, as a record is, to its latest `GONE_FILES_KEPT` places once it holds twice as many: a list's
`after` names a deleted file's place across restarts too. Ids are random. The
records live in memory too: the server reads them there and writes each change through to disk. Every method but
`write_content` runs on the server's event loop; `write_content` touches only its own file and may run in a worker
thread. The synced disk work of the others (a record's write, a deletion's log append or rewrite and removals) runs
on the store's one disk thread, awaited by its caller: the loop never waits on fsync (every streaming answer would
stall), and writes reach the disk one at a time, in the order they were made. A record is serialized at the call,
so the loop may change it while its write waits; a new record enters memory once it is on disk.

A file may expire (OpenAI's `expires_after`): its object has `expires_at`, and `expire_files` deletes it, object and
content, once `clock()` reaches that second. The routes call it on every access and the runner on a sweep, so an
expired file is never served and its content leaves the disk even when nobody asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional

from ..runtime.checkpoint_io import atomic_file, blocking_file

log = logging.getLogger(__name__)


@dataclass
class Record:
    body: dict[str, Any]  # the object as the API answers it
    created_ns: int  # orders lists and the queue (created_at counts whole seconds)
    output_expires_after: Optional[int] = None  # a batch's: seconds its output files live (None: until deleted)
    # a batch's runs that a server started and never ended: the process died in them (a crash, SIGKILL, OOM)
    interrupted_runs: int = 0


GONE_FILES_KEPT = 100_000  # deleted or expired files whose place a list's `after` may still name


def clock() -> float:
    """The time file expiry reads, in seconds (one function, so that tests can move it forward)."""
    return time.time()


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def page(records: dict[str, Record], limit: int, after: Optional[tuple[int, str]],
         newest_first: bool = True) -> dict[str, Any]:
    """OpenAI's list object over `records`: `limit` of them after the place `after` (an object's `created_ns` and id;
    the object may be gone), and whether more follow."""
    def place(r: Record) -> tuple[int, str]:
        return r.created_ns, r.body["id"]

    ordered = sorted(records.values(), key=place, reverse=newest_first)
    if after is not None:
        ordered = [r for r in ordered if (place(r) < after if newest_first else place(r) > after)]
    data = [r.body for r in ordered[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit}


def check_batch_dir(root: str) -> None:
    """Refuse a batch directory that cannot be one (an existing file, or a path through a file), before the
    server loads its model; a directory that does not exist yet is made when the store opens."""
    path = blocking_file(root)
    if path is not None:
        raise ValueError(f"the batch directory {root!r} cannot be made: {path!r} is a file, not a directory")


class BatchStore:
    def __init__(self, root: str) -> None:
        check_batch_dir(root)
        self.files_dir = os.path.join(root, "files")
        self.batches_dir = os.path.join(root, "batches")
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.batches_dir, exist_ok=True)
        self.files = {k: r for k, r in self._load(self.files_dir).items() if os.path.isfile(self.content_path(k))}
        self.batches = self._load(self.batches_dir)
        # the created_ns of deleted and expired files (the latest GONE_FILES_KEPT): a client paging the list with
        # `after` set to one of them (it deleted each file it listed, or the file expired) goes on from its place
        self.gone_path = os.path.join(root, "gone_files.jsonl")
        # the log's lines (the disk thread's alone); -1: it may end in a torn line (a crash, a full disk) or hold more
        # than it keeps, and is rewritten whole at the next deletion
        self.gone_files, self._gone_lines = self._load_gone(self.gone_path)
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="batch-store")  # one thread: deletions stay in order
        self._gone_lock = threading.Lock()  # a rewrite copies gone_files on the disk thread while the loop adds

    @staticmethod
    def _load_gone(path: str) -> tuple[dict[str, int], int]:
        """The places in a gone-files log (the latest GONE_FILES_KEPT), and its line count (-1: not as a rewrite
        leaves it)."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return {}, 0
        gone: dict[str, int] = {}
        lines = text.split("\n")[:-1]  # what follows the last newline: a line a crash tore
        for line in lines:
            try:
                saved = json.loads(line)
                gone[str(saved["id"])] = int(saved["created_ns"])
            except (ValueError, KeyError, TypeError):
                continue
        kept = dict(list(gone.items())[-GONE_FILES_KEPT:])
        # as a rewrite leaves it: no torn last line, and a line per place kept (none skipped, repeated or dropped)
        whole = not text or (text.endswith("\n") and len(lines) == len(kept))
        return kept, len(lines) if whole else -1

    def _save_gone(self, file_id: str, created_ns: int) -> None:
        """Persist a deleted file's place (on the disk thread): appended, and synced (a delete outlives a power cut);
        the log rewritten whole once it holds twice GONE_FILES_KEPT lines, or may end in a torn line."""
        if not 0 <= self._gone_lines < 2 * GONE_FILES_KEPT:
            with self._gone_lock:
                places = dict(self.gone_files)
            with atomic_file(self.gone_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"id": k, "created_ns": v}) + "\n" for k, v in places.items())
            self._gone_lines = len(places)
            return
        with open(self.gone_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": file_id, "created_ns": created_ns}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._gone_lines += 1

    @staticmethod
    def _load(directory: str) -> dict[str, Record]:
        records = {}
        for name in os.listdir(directory):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    saved = json.load(f)
                record = Record(saved["body"], int(saved["created_ns"]), saved.get("output_expires_after"),
                                int(saved.get("interrupted_runs", 0)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("skipping unreadable record %s: %s", os.path.join(directory, name), e)
                continue
            records[record.body["id"]] = record
        return records

    async def _on_disk(self, work: Callable[..., None], *args: Any) -> None:
        """Run `work(*args)` on the store's disk thread, after the work queued before it. Shielded: a cancelled caller
        (uvicorn's graceful-shutdown timeout, the runner's close) must not drop the queued work, or memory and disk
        would part (a file gone from memory back after a restart, a batch's last state never written)."""
        await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._disk, work, *args))

    async def _save_record(self, path: str, record: Record) -> None:
        """Write `record` as it is now (serialized here, on the loop, which may change it while the write waits)."""
        text = json.dumps({"created_ns": record.created_ns, "body": record.body,
                           "output_expires_after": record.output_expires_after,
                           "interrupted_runs": record.interrupted_runs})
        await self._on_disk(self._write, path, text)

    @staticmethod
    def _write(path: str, text: str) -> None:
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    def content_path(self, file_id: str) -> str:
        return os.path.join(self.files_dir, file_id + ".data")

    def write_content(self, file_id: str, fill: Callable[[IO[bytes]], None]) -> int:
        """The content of a new file, written by `fill`; returns its size in bytes."""
        path = self.content_path(file_id)
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                fill(f)
            size = os.path.getsize(tmp)
        return size

    async def add_file(self, file_id: str, size: int, filename: str, purpose: str,
                       expires_after: Optional[int] = None) -> Record:
        """The object of a file whose content is written; expires_after: seconds it lives (None: until deleted). In
        `files` once its object is on disk."""
        now = time.time_ns()
        created_at = now // 10**9
        expires_at = None if expires_after is None else created_at + expires_after
        record = Record({"id": file_id, "object": "file", "bytes": size, "created_at": created_at,
                         "filename": filename, "purpose": purpose, "status": "processed", "expires_at": expires_at,
                         "status_details": None}, now)
        await self._save_record(os.path.join(self.files_dir, file_id + ".json"), record)
        self.files[file_id] = record
        return record

    async def delete_file(self, file_id: str) -> None:
        """Delete a file in `files`: gone from memory at the call (no await before), from the disk when it returns."""
        created_ns = self.files.pop(file_id).created_ns
        with self._gone_lock:
            self.gone_files[file_id] = created_ns
            if len(self.gone_files) > GONE_FILES_KEPT:
                del self.gone_files[next(iter(self.gone_files))]
        await self._on_disk(self._delete_on_disk, file_id, created_ns)

    def _delete_on_disk(self, file_id: str, created_ns: int) -> None:
        try:
            self._save_gone(file_id, created_ns)
        except OSError as e:  # a full disk must not keep a file (deleting frees space): its place lives in memory
            self._gone_lines = -1  # a write cut short may have torn the log's last line
            log.warning("file %s's place was not saved (a list's `after` names it until the server stops): %s",
                        file_id, e)
        # the object first (no object, no file); a part already gone is no error
        for path in (os.path.join(self.files_dir, file_id + ".json"), self.content_path(file_id)):
            self._remove(path)

    async def expire_files(self) -> list[str]:
        """Delete the files whose `expires_at` has come; their ids."""
        now = clock()
        gone = [k for k, r in self.files.items() if r.body["expires_at"] is not None and r.body["expires_at"] <= now]
        for file_id in gone:
            if file_id in self.files:  # not deleted by a call that ran while this one awaited
                log.info("file %s expired", file_id)
                await self.delete_file(file_id)
        return gone

    async def add_batch(self, body: dict[str, Any], window: int, output_expires_after: Optional[int] = None
                        ) -> Record:
        """A new batch object, its `created_at` set here and `expires_at` `window` seconds later (its completion
        window); output_expires_after: seconds its output files live. In `batches` once it is on disk: a failed
        write (a full disk) lists no batch that never runs."""
        now = time.time_ns()
        created_at = now // 10**9
        record = Record({**body, "created_at": created_at, "expires_at": created_at + window}, now,
                        output_expires_after)
        await self.save_batch(record)
        self.batches[body["id"]] = record
        return record

    async def drop_batch(self, batch_id: str) -> None:
        """Forget a batch whose creation failed half way (its record renamed into place, its directory not synced),
        on disk too."""
        self.batches.pop(batch_id, None)
        await self._on_disk(self._remove, os.path.join(self.batches_dir, batch_id + ".json"))

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    async def save_batch(self, record: Record) -> None:
        """Write a batch's record as it is now; writes reach the disk in the order of the calls."""
        await self._save_record(os.path.join(self.batches_dir, record.body["id"] + ".json"), record)
