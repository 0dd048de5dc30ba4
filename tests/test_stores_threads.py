"""Stores a process shares between threads (an app's worker pool, a notebook's training thread beside its data
inspection): the open tar shards' files and the `LRU` behind the feature, prefix and media caches. Each test parks
one thread at the line where another thread's call would split its work (`_parked_at`), and lets the other run."""

from __future__ import annotations

import inspect
import io
import os
import signal
import sys
import tarfile
import threading
import time
from typing import Any, Callable

import pytest
import torch

from flamingo.data.sources import read_records
from flamingo.runtime.lru import LRU


def _parked_at(function: Callable, text: str, parked: threading.Event, go: threading.Event) -> Callable[..., Any]:
    """A trace function that stops the thread it is set on at the first line of `function` containing `text`, until
    `go` is set (at most 1 s: a call that waits for the parked one is let through)."""
    code = function.__code__
    lines, first = inspect.getsourcelines(function)
    line = next(first + i for i, source in enumerate(lines) if text in source)

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == line and not parked.is_set():
            parked.set()
            go.wait(1.0)
        return local

    def trace(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    return trace


def _run_parked(trace: Callable, parked_call: Callable[[], Any], other_call: Callable[[], Any],
                parked: threading.Event, go: threading.Event) -> dict[str, Any]:
    """`parked_call` on a thread stopped by `trace`, then `other_call` on another while it waits; both results."""
    out: dict[str, Any] = {}

    def parked_thread() -> None:
        sys.settrace(trace)
        try:
            out["parked"] = parked_call()
        except Exception as e:  # what a split call raises
            out["parked"] = e
        finally:
            sys.settrace(None)

    def other_thread() -> None:
        out["other"] = other_call()

    a = threading.Thread(target=parked_thread)
    a.start()
    assert parked.wait(30)
    b = threading.Thread(target=other_thread)
    b.start()
    b.join(0.5)  # it finishes while the parked one waits, unless the store makes it wait its turn
    go.set()
    a.join(30)
    b.join(30)
    return out


def _shard(path: str, blobs: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data in blobs.items():
            for ext, content in (("bin", data), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def test_two_threads_reading_one_shard_each_get_their_own_bytes(tmp_path):
    """The readers of a shard share its open file, and tarfile seeks, then reads: a read split by another thread's
    returned bytes of the right length from elsewhere in the shard (NUL padding here), no error, nothing counted."""
    path = str(tmp_path / "shard-000.tar")
    blobs = {"s000": b"A" * 5000, "s001": b"B" * 5000}
    _shard(path, blobs)
    records = {r.key.split(":")[-1]: r for r in read_records(path)}
    parked, go = threading.Event(), threading.Event()
    trace = _parked_at(tarfile._FileInFile.read, "self.fileobj.read(length)", parked, go)
    first, second = records["s000"], records["s001"]
    out = _run_parked(trace, lambda: first.shard.read(first.payload["bin"]),
                      lambda: second.shard.read(second.payload["bin"]), parked, go)
    assert out["parked"] == blobs["s000"] and out["other"] == blobs["s001"]


def test_opening_other_shards_never_closes_one_a_thread_is_reading(tmp_path):
    """Opening a shard may evict the least recently used open one and close its file: another thread's read of that
    shard failed ("I/O operation on closed file") and its sample was counted as bad_shard."""
    from flamingo.data.sources import _MAX_OPEN_SHARDS, open_shard

    paths = [str(tmp_path / f"shard-{i:03d}.tar") for i in range(_MAX_OPEN_SHARDS + 1)]
    for path in paths:
        _shard(path, {"s000": b"A" * 5000})
    first = next(iter(read_records(paths[0])))
    parked, go = threading.Event(), threading.Event()
    trace = _parked_at(tarfile._FileInFile.read, "self.fileobj.read(length)", parked, go)

    def open_others() -> None:
        for path in paths[1:]:
            open_shard(path)

    out = _run_parked(trace, lambda: first.shard.read(first.payload["bin"]), open_others, parked, go)
    assert out["parked"] == b"A" * 5000


def test_an_lru_shared_by_threads_keeps_its_items_and_its_count():
    """`get` found a key, then another thread's `put` evicted it before `get` moved it to the end: a bare KeyError,
    and the byte count could drift until every later call failed. One caller at a time now."""
    store: LRU[str, torch.Tensor] = LRU(2)
    store.put("a", torch.zeros(1))
    store.put("b", torch.ones(1))
    parked, go = threading.Event(), threading.Event()
    trace = _parked_at(LRU.get, "self._items.move_to_end(key)", parked, go)

    def evict() -> None:
        store.put("c", torch.full((1,), 2.0))
        store.put("d", torch.full((1,), 3.0))

    out = _run_parked(trace, lambda: store.get("a"), evict, parked, go)
    assert torch.equal(out["parked"], torch.zeros(1))
    assert store.size == len(store) == 2 and "d" in store


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_while_other_threads_use_the_stores_works(tmp_path):
    """A DataLoader worker forked while another thread of the parent held a store's lock (using a cache, opening an
    image) or was reading a shard (its file's own lock held) inherited them held by a thread it does not have: its
    first cache use or image, or the fork handler closing its parent's shards, waited forever. A fork now waits for
    the shard being read, and the child's stores start with fresh locks."""
    from PIL import Image

    from flamingo.runtime import media_formats

    path, png = str(tmp_path / "shard-000.tar"), str(tmp_path / "image.png")
    _shard(path, {f"s{i:03d}": os.urandom(1_000_000) for i in range(8)})
    Image.new("RGB", (4, 4)).save(png)
    records = list(read_records(path))
    store: LRU[str, int] = LRU(4)
    holding, release, reading = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with store._lock, media_formats._SILENCED:
            holding.set()
            release.wait(60)

    def read() -> None:
        while not release.is_set():
            for record in records:
                record.shard.read(record.payload["bin"])
                reading.set()

    threads = [threading.Thread(target=hold), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    assert holding.wait(30) and reading.wait(30)
    try:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:  # the child: one thread, the locks' holders left behind
                ok = False
                try:
                    store.put("a", 1)
                    with media_formats.open_image(png) as image:
                        ok = store.get("a") == 1 and image.size == (4, 4) and \
                            len(records[0].shard.read(records[0].payload["bin"])) == 1_000_000
                finally:
                    os._exit(0 if ok else 1)
            deadline = time.monotonic() + 20
            while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            if done[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the forked child hung or failed"
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
