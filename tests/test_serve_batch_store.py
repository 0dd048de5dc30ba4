"""The Batch API's store (serve/batch_store.py): the places of deleted and expired files, which a files list's `after`
may name, outlive the server (persisted in `gone_files.jsonl`), bounded to the latest `GONE_FILES_KEPT`, and a line
torn by a crash costs only itself; the log's synced writes run off the event loop, before the object goes; so do the
records' writes, in the order they were made, each of the record as it was at the call."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest

from flamingo.serve import batch_store
from flamingo.serve.batch_store import BatchStore


def _add(store: BatchStore, name: str) -> str:
    file_id = batch_store.new_id("file-")
    size = store.write_content(file_id, lambda f: f.write(b"{}\n"))
    asyncio.run(store.add_file(file_id, size, name, "batch"))
    return file_id


def _delete(store: BatchStore, *file_ids: str) -> None:
    async def run() -> None:
        for file_id in file_ids:
            await store.delete_file(file_id)

    asyncio.run(run())


def _log_lines(root) -> list[str]:
    return (root / "gone_files.jsonl").read_text().splitlines()


def test_deleted_files_places_outlive_the_store(tmp_path):
    store = BatchStore(str(tmp_path))
    ids = [_add(store, f"f{k}.jsonl") for k in range(3)]
    places = {k: store.files[k].created_ns for k in ids[:2]}
    _delete(store, *ids[:2])
    again = BatchStore(str(tmp_path))
    assert again.gone_files == places and list(again.files) == [ids[2]]


def test_the_places_kept_are_bounded_and_a_torn_line_costs_only_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_store, "GONE_FILES_KEPT", 3)
    store = BatchStore(str(tmp_path))
    ids = [_add(store, f"f{k}.jsonl") for k in range(8)]
    _delete(store, *ids[:7])
    # appended up to twice the bound, then rewritten to the latest 3 (the 7th deletion's rewrite)
    assert [json.loads(line)["id"] for line in _log_lines(tmp_path)] == ids[4:7]
    assert list(BatchStore(str(tmp_path)).gone_files) == ids[4:7]

    with open(tmp_path / "gone_files.jsonl", "a") as f:
        f.write('{"id": "file-torn", "created')  # a crash while a place was appended
    store = BatchStore(str(tmp_path))
    assert list(store.gone_files) == ids[4:7]
    _delete(store, ids[7])  # on a line of its own
    assert list(BatchStore(str(tmp_path)).gone_files) == [*ids[5:7], ids[7]]
    assert all(json.loads(line) for line in _log_lines(tmp_path))


def test_a_place_that_cannot_be_saved_does_not_keep_its_file(tmp_path, monkeypatch, caplog):
    """A full disk: the file is deleted all the same (deleting frees space); its place lives in memory."""
    store = BatchStore(str(tmp_path))
    file_id = _add(store, "f.jsonl")

    def full(_file_id, _created_ns):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_save_gone", full)
    _delete(store, file_id)
    assert file_id not in store.files and file_id in store.gone_files
    assert not (tmp_path / "files" / f"{file_id}.data").exists()
    assert "was not saved" in caplog.text


def test_the_logs_synced_append_runs_off_the_loop_before_the_object_goes(tmp_path, monkeypatch):
    """fsync blocks for milliseconds (seconds on a busy disk): it runs on the store's disk thread while the loop
    serves, and the place is on disk before the file's object leaves it, for two deletions made at once too."""
    store = BatchStore(str(tmp_path))
    ids = [_add(store, f"f{k}.jsonl") for k in range(2)]
    synced = []
    fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        fsync(fd)
        logged = [json.loads(line)["id"] for line in _log_lines(tmp_path)]
        objects = {k for k in ids if (tmp_path / "files" / f"{k}.json").exists()}
        synced.append((threading.get_ident(), logged, objects))

    monkeypatch.setattr(os, "fsync", watched_fsync)

    async def run() -> int:
        await asyncio.gather(store.delete_file(ids[0]), store.delete_file(ids[1]))
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert [logged for _, logged, _ in synced] == [ids[:1], ids]
    assert [objects for _, _, objects in synced] == [set(ids), {ids[1]}]  # each place logged while its object stays
    assert all(thread != loop_thread for thread, _, _ in synced)
    assert not list((tmp_path / "files").iterdir())


def test_a_deletion_whose_caller_is_cancelled_still_reaches_the_disk(tmp_path, monkeypatch):
    """A deletion queued behind another's synced write, its task cancelled (uvicorn's graceful-shutdown timeout, the
    runner's sweep on close): gone from memory, its disk work was dropped, and the file came back after a restart."""
    store = BatchStore(str(tmp_path))
    first, second = _add(store, "a.jsonl"), _add(store, "b.jsonl")
    started, release = threading.Event(), threading.Event()
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a busy disk: the first deletion's write holds the store's thread
        started.set()
        release.wait(10)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def run() -> None:
        a = asyncio.create_task(store.delete_file(first))
        b = asyncio.create_task(store.delete_file(second))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        b.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(a, b, return_exceptions=True)

    asyncio.run(run())
    store._disk.shutdown(wait=True)  # the queued work runs to its end
    again = BatchStore(str(tmp_path))
    assert not again.files and set(again.gone_files) == {first, second}


def _on_disk(root, batch_id: str) -> dict:
    return json.loads((root / "batches" / f"{batch_id}.json").read_text())["body"]


def test_records_are_written_off_the_loop(tmp_path, monkeypatch):
    """An upload, a batch's creation and its status change each sync twice (the record, its directory): fsync blocks
    for milliseconds, seconds on a network disk, and on the loop it stalled every streaming answer that long. The
    loop serves while they sync, and each record is on disk when its call returns."""
    store = BatchStore(str(tmp_path))
    file_id = batch_store.new_id("file-")
    size = store.write_content(file_id, lambda f: f.write(b"{}\n"))
    synced_on = []
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a slow disk
        synced_on.append(threading.get_ident())
        time.sleep(0.2)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def ticking(write) -> int:
        """The loop's 10 ms ticks while `write` is awaited."""
        ticks, done = [0], asyncio.Event()

        async def tick() -> None:
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks[0] += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)  # the ticker starts
        await write()
        done.set()
        await ticker
        return ticks[0]

    async def run() -> tuple[list[int], int]:
        body = {"id": "batch_1", "object": "batch", "status": "validating"}
        uploaded = await ticking(lambda: store.add_file(file_id, size, "f.jsonl", "batch"))
        created = await ticking(lambda: store.add_batch(body, 3600))
        assert _on_disk(tmp_path, "batch_1")["status"] == "validating"
        store.batches["batch_1"].body["status"] = "in_progress"
        changed = await ticking(lambda: store.save_batch(store.batches["batch_1"]))
        return [uploaded, created, changed], threading.get_ident()

    ticks, loop_thread = asyncio.run(run())
    assert all(n >= 10 for n in ticks), ticks  # two 0.2 s fsyncs each: ~40 ticks; 0 when they block the loop
    assert synced_on and loop_thread not in synced_on
    again = BatchStore(str(tmp_path))
    assert list(again.files) == [file_id] and again.batches["batch_1"].body["status"] == "in_progress"
    assert again.batches["batch_1"].body["expires_at"] == again.batches["batch_1"].body["created_at"] + 3600


def test_a_records_writes_reach_the_disk_in_order_each_as_it_was_at_its_call(tmp_path, monkeypatch):
    """The worker changes a batch while an earlier write of it waits on the disk thread; a write whose caller is
    cancelled (uvicorn's graceful-shutdown timeout, the runner's close) still runs, after the ones made before it: the
    disk holds the record as the last write's call saw it, not a later change made in memory only."""
    store = BatchStore(str(tmp_path))
    started, release = threading.Event(), threading.Event()
    fsync = os.fsync

    def held_fsync(fd: int) -> None:  # a busy disk: the first write holds the store's thread
        started.set()
        release.wait(10)
        fsync(fd)

    async def run() -> None:
        record = await store.add_batch({"id": "batch_1", "object": "batch", "status": "validating"}, 3600)
        monkeypatch.setattr(os, "fsync", held_fsync)
        record.body["status"] = "in_progress"
        first = asyncio.create_task(store.save_batch(record))
        await asyncio.sleep(0)  # queued
        record.body.update(status="cancelling", request_counts={"total": 2})
        second = asyncio.create_task(store.save_batch(record))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        second.cancel()
        await asyncio.sleep(0)
        record.body["status"] = "cancelled"  # in memory, not written
        release.set()
        await asyncio.gather(first, second, return_exceptions=True)

    asyncio.run(run())
    store._disk.shutdown(wait=True)  # the queued work runs to its end
    written = _on_disk(tmp_path, "batch_1")
    assert written["status"] == "cancelling" and written["request_counts"] == {"total": 2}


def test_a_batch_that_cannot_be_written_is_not_listed(tmp_path, monkeypatch):
    """A full disk as a batch is created: the error reaches the caller, and the batch is neither in memory (listed,
    never run) nor on disk once dropped."""
    store = BatchStore(str(tmp_path))

    def full(path: str, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write", full)

    async def run() -> None:
        with pytest.raises(OSError):
            await store.add_batch({"id": "batch_1", "object": "batch", "status": "validating"}, 3600)
        assert "batch_1" not in store.batches
        await store.drop_batch("batch_1")

    asyncio.run(run())
    assert not store.batches and not list((tmp_path / "batches").iterdir())
