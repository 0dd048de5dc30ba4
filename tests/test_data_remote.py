"""Remote shards (data/remote.py): tar shards named by URL, `hf://datasets/...` or `pipe:` give the batches their local
copies give, across workers and after a resume; the shard cache stays within its budget; a shard that cannot be
fetched is skipped with a warning and the others still read. A local HTTP server stands in for the remote store
(it also serves the Hub's `resolve` paths, with `HF_ENDPOINT` pointing at it)."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import shutil
import sys
import threading
import warnings
from typing import Optional

import pytest
import torch

from flamingo.data import build_source
from flamingo.data.fixtures import make_interleaved, make_pair_shards, tiny_processor
from flamingo.data.remote import ShardFetcher, compression_of, hub_url
from flamingo.data.sources import expand_path
from flamingo.train.config import DatasetSection


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []
    damaged: dict[str, str] = {}  # path -> how its next answer is damaged ("html" or "cut"), once

    def _answer(self, body: bytes, content_type: Optional[str] = None, length: bool = True) -> None:
        """A 200 with `body` (a `Content-Length`, unless `length` is False: the connection then ends it)."""
        self.send_response(200)
        for name, value in (("Content-Type", content_type), ("Content-Length", str(len(body)) if length else None),
                            ("Connection", None if length else "close")):
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = not length

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        _Handler.requests.append(self.path)
        damage = _Handler.damaged.pop(self.path, None)
        if damage is not None and damage != "html":
            with open(os.path.join(self.directory, self.path.lstrip("/")), "rb") as f:
                data = f.read()
        if damage == "html":  # a proxy's or a rate limiter's page, answered 200
            return self._answer(b"<html><body>Too many requests, try again later</body></html>", "text/html")
        if damage == "origin":  # the store's own file is cut (a length that says so): every answer alike
            _Handler.damaged[self.path] = "origin"
            return self._answer(data[:len(data) // 2])
        if damage == "cut":  # no length, and the connection ends half way
            return self._answer(data[:len(data) // 2], length=False)
        if self.path.startswith("/api/datasets/someone/shards/tree/main"):  # the Hub's listing of the repository
            root = self.directory
            files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)
            return self._answer(json.dumps([{"type": "file", "path": f, "size": os.path.getsize(os.path.join(root, f)),
                                             "oid": "0" * 40} for f in files]).encode(), "application/json")
        if self.path.startswith("/datasets/someone/shards/resolve/main/"):  # the Hub's download path
            self.path = "/" + self.path.rsplit("/", 1)[-1]
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    handler = functools.partial(_Handler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.requests, _Handler.damaged = [], {}
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _shards(cache) -> list[str]:
    """The cached shards (not the download locks' directory)."""
    return [name for name in os.listdir(cache) if name != ".fetching"]


def _batches(section: DatasetSection, processor, **kwargs):
    source = build_source(section, processor, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(source), source


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["keys"] == y["keys"] and all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))
        for x, y in zip(a, b))


def test_shards_by_url_give_the_local_batches_in_workers_and_after_a_resume(tmp_path, server, processor):
    root, url = server
    data = make_pair_shards(str(root), 12, 3)  # 4 shards
    cache = str(tmp_path / "cache")
    options = {"remote_cache_dir": cache, "shuffle_buffer": 8}
    remote = f"{url}/shard-{{000000..000003}}.tar"
    local, _ = _batches(DatasetSection("p", "pairs", data["path"], 2, options=options), processor)
    fetched, source = _batches(DatasetSection("p", "pairs", remote, 2, options=options), processor)
    assert _same(fetched, local) and len(local) == 6
    assert sorted(_Handler.requests) == [f"/shard-{i:06d}.tar" for i in range(4)]  # each fetched once
    assert len(_shards(cache)) == 4  # into the configured cache
    again, _ = _batches(DatasetSection("p", "pairs", remote, 2, options=options), processor)
    assert _same(again, local) and len(_Handler.requests) == 4  # from the cache

    shutil.rmtree(cache)
    workers, _ = _batches(DatasetSection("p", "pairs", remote, 2, options=options), processor, num_workers=2)
    local_workers, _ = _batches(DatasetSection("p", "pairs", data["path"], 2, options=options), processor,
                                num_workers=2)
    assert _same(workers, local_workers)

    resumed = build_source(DatasetSection("p", "pairs", remote, 2, options=options), processor)
    it = iter(resumed)
    first = [next(it) for _ in range(2)]
    state = resumed.state_dict()
    resumed = build_source(DatasetSection("p", "pairs", remote, 2, options=options), processor)
    resumed.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _same(first + list(resumed), local)


def test_hub_and_pipe_shards_and_interleaved_documents(tmp_path, server, processor, monkeypatch):
    root, url = server
    docs = make_interleaved(str(tmp_path / "docs"), 6, bad=False, tar_shards=2)
    for path in docs["files"]:
        shutil.copy(path, root / os.path.basename(path))
    names = sorted(os.listdir(root))
    monkeypatch.setenv("HF_ENDPOINT", url)
    options = {"remote_cache_dir": str(tmp_path / "cache"), "shuffle": False}
    local, _ = _batches(DatasetSection("d", "interleaved", docs["path"], 1, options=options), processor)
    hub = "hf://datasets/someone/shards/{" + ",".join(names) + "}"
    fetched, _ = _batches(DatasetSection("d", "interleaved", hub, 1, options=options), processor)
    assert _same(fetched, local) and len(local) > 0
    assert all(r.startswith("/datasets/someone/shards/resolve/main/") for r in _Handler.requests)

    copy = (f"{sys.executable} -c \"import shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), "
            f"sys.stdout.buffer)\"")
    pipe = "pipe:" + copy + " " + str(root) + "/{" + ",".join(names) + "}"
    piped, _ = _batches(DatasetSection("d", "interleaved", pipe, 1, options={**options, "remote_cache_dir":
                                                                             str(tmp_path / "cache2")}), processor)
    assert _same(piped, local)

    # The same shards by glob and by directory: one listing call to the Hub, then its tar files only, sorted.
    (root / "README.md").write_text("not a shard")
    (root / "sub").mkdir()
    shutil.copy(root / names[0], root / "sub" / names[0])
    _Handler.requests = []
    by_glob = expand_path("hf://datasets/someone/shards/*.tar")
    assert by_glob == [f"hf://datasets/someone/shards/{n}" for n in names]
    assert len(_Handler.requests) == 1 and _Handler.requests[0].startswith("/api/datasets/someone/shards/tree/main")
    assert expand_path("hf://datasets/someone/shards/") == sorted(by_glob + [f"hf://datasets/someone/shards/sub/"
                                                                            f"{names[0]}"])
    assert expand_path("hf://datasets/someone/shards/sub/") == [f"hf://datasets/someone/shards/sub/{names[0]}"]
    listed, _ = _batches(DatasetSection("d", "interleaved", "hf://datasets/someone/shards/*.tar", 1,
                                        options=options), processor)
    assert _same(listed, local)
    with pytest.raises(ValueError, match="no tar shards"):
        expand_path("hf://datasets/someone/shards/*.parquet")

    assert hub_url("hf://datasets/org/name@v1.0/sub/shard 1.tar")[0] == \
        f"{url}/datasets/org/name/resolve/v1.0/sub/shard%201.tar"
    with pytest.raises(ValueError, match="hf://datasets/ORG/NAME"):
        hub_url("hf://models/org/name/x.tar")


def test_an_unreachable_shard_is_skipped_with_a_warning_and_the_cache_keeps_its_budget(tmp_path, server, processor):
    root, url = server
    make_pair_shards(str(root), 12, 3)  # 4 shards of ~same size
    size = os.path.getsize(root / "shard-000000.tar")
    cache = tmp_path / "cache"
    options = {"remote_cache_dir": str(cache), "remote_cache_gb": 2.5 * size / 2**30, "shuffle": False}
    section = DatasetSection("p", "pairs", f"{url}/shard-{{000000..000004}}.tar", 1, options=options)  # 4 exists
    source = build_source(section, processor)
    with pytest.warns(UserWarning, match=r"shard-000004\.tar: HTTPError.*404.*its samples are skipped"):
        batches = list(source)
    assert len(batches) == 12 and source.skipped == {"bad_shard": 1}
    assert 1 <= len(_shards(cache)) <= 2  # the least recently used shards left
    assert sum(os.path.getsize(cache / f) for f in _shards(cache)) <= 2.5 * size
    fetcher = ShardFetcher(str(cache), 10 * size, retries=2)
    assert _Handler.requests.count("/shard-000004.tar") == 2  # the prefetch's and the read's: a 404 is not retried
    with pytest.raises(Exception, match="404"):
        fetcher.fetch(f"{url}/shard-000004.tar")
    with pytest.raises(ValueError, match="remote data must be tar shards"):
        expand_path(f"{url}/pairs.jsonl")


@pytest.mark.parametrize("damage", ["html", "cut"])
def test_a_damaged_download_is_fetched_again_not_cached(tmp_path, server, damage):
    """A 200 whose body is no whole tar (a proxy's HTML page; a body cut short without a Content-Length) is an
    attempt that failed: cached, it would be read damaged in every epoch and never fetched again. Partial downloads
    another process left (killed mid-download) are removed; this process's own threads' stay."""
    root, url = server
    make_pair_shards(str(root), 6, 3)
    fetcher = ShardFetcher(str(tmp_path / "cache"), 2**30, retries=2)
    source = f"{url}/shard-000001.tar"
    os.makedirs(tmp_path / "cache")
    stale, ours = (fetcher.local_path(source) + f".part-{pid}-1" for pid in (2**22 + 7, os.getpid()))
    for path in (stale, ours):
        with open(path, "wb") as f:
            f.write(b"half a shard")
    _Handler.damaged["/shard-000001.tar"] = damage
    local = fetcher.fetch(source)
    try:
        with open(local, "rb") as f, open(root / "shard-000001.tar", "rb") as g:
            assert f.read() == g.read()
    finally:
        fetcher.release(local)
    assert _Handler.requests.count("/shard-000001.tar") == 2
    assert not os.path.exists(stale) and os.path.exists(ours)


def test_a_shard_cut_at_its_origin_is_kept_and_read_to_its_damage(tmp_path, server, processor):
    """A store whose file is itself cut (its Content-Length vouching for the cut length) gives the same bytes every
    time: kept at the first download and read as the local file is, its whole samples kept, its cut one counted
    (fetching it again would lose every sample, at the shard's size per attempt)."""
    root, url = server
    make_pair_shards(str(root), 6, 3)
    _Handler.damaged["/shard-000001.tar"] = "origin"
    section = DatasetSection("p", "pairs", f"{url}/shard-{{000000..000001}}.tar", 1,
                             options={"remote_cache_dir": str(tmp_path / "cache"), "shuffle": False})
    batches, source = _batches(section, processor)
    assert 3 < len(batches) < 6 and source.skipped == {"bad_shard": 1}
    assert _Handler.requests.count("/shard-000001.tar") == 1


def test_a_gzipped_shard_is_cached_decompressed_and_gives_the_plain_shards_batches(tmp_path, server, processor):
    """A seek back in a gzip stream decompresses it again from its start: the cache holds the plain tar."""
    root, url = server
    data = make_pair_shards(str(tmp_path / "local"), 6, 3)
    for i, path in enumerate(data["files"]):
        with open(path, "rb") as f:
            (root / f"shard-{i:06d}.tar.gz").write_bytes(gzip.compress(f.read()))
    cache = tmp_path / "cache"
    options = {"remote_cache_dir": str(cache), "shuffle_buffer": 4}
    local, _ = _batches(DatasetSection("p", "pairs", data["path"], 2, options=options), processor)
    fetched, source = _batches(DatasetSection("p", "pairs", f"{url}/shard-{{000000..000001}}.tar.gz", 2,
                                              options=options), processor)
    assert [b["keys"] for b in fetched] == [[k.replace(".tar:", ".tar.gz:") for k in b["keys"]] for b in local]
    assert source.skipped == {}
    cached = sorted(_shards(cache))
    assert len(cached) == 2 and all(compression_of(str(cache / name)) is None for name in cached)
    assert sorted(os.path.getsize(cache / name) for name in cached) == sorted(map(os.path.getsize, data["files"]))


def test_records_outliving_their_shard_in_the_cache_fetch_it_again(tmp_path, server, processor):
    """A cache of one shard, a shuffle buffer holding records of all 12: the shards leave the cache (and the open
    ones close) while their records wait; reading one fetches its shard again, and no sample is lost."""
    root, url = server
    make_pair_shards(str(root), 12, 1)
    size = os.path.getsize(root / "shard-000000.tar")
    options = {"remote_cache_dir": str(tmp_path / "cache"), "remote_cache_gb": 1.5 * size / 2**30,
               "shuffle_buffer": 1000}
    batches, source = _batches(DatasetSection("p", "pairs", f"{url}/shard-{{000000..000011}}.tar", 1,
                                              options=options), processor)
    assert source.skipped == {} and len(batches) == 12
    assert len(_Handler.requests) > 12  # some shards fetched twice


def _fetch_in_child(fetcher, source, out) -> None:
    out.put(os.path.getsize(fetcher.fetch(source)))


def test_a_worker_forked_while_a_fetch_holds_its_locks_still_fetches(tmp_path):
    """DataLoader workers fork from a process whose prefetch threads may hold the fetcher's locks at that moment."""
    import multiprocessing

    from flamingo.data import remote

    shard = make_pair_shards(str(tmp_path / "data"), 2, 2)["files"][0]
    fetcher = ShardFetcher(str(tmp_path / "cache"), 2**30)
    source = f"pipe:cat {shard}"
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    with remote._LOCKS_GUARD:  # as a prefetch thread does for an instant
        child = context.Process(target=_fetch_in_child, args=(fetcher, source, out))
        child.start()
        child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0 and out.get(timeout=5) == os.path.getsize(shard)


def _hold_pin(fetcher, source, pinned, done) -> None:
    fetcher.fetch(source)  # pinned until this process ends, as a worker between fetching and opening a shard
    pinned.set()
    done.wait(60)


def test_a_shard_another_process_is_about_to_open_is_never_evicted(tmp_path):
    """Eviction removes a shard only under an exclusive lock; a pin (fetch until release) holds a shared one, seen
    by every process using the cache, so a worker's just-fetched shard cannot vanish before it opens it."""
    import multiprocessing

    make_pair_shards(str(tmp_path / "src"), 9, 3)
    shards = sorted((tmp_path / "src").glob("shard-*.tar"))
    sources = [f"pipe:cat {path}" for path in shards]
    fetcher = ShardFetcher(str(tmp_path / "cache"), int(1.5 * os.path.getsize(shards[0])))
    context = multiprocessing.get_context("fork")
    pinned, done = context.Event(), context.Event()
    child = context.Process(target=_hold_pin, args=(fetcher, sources[0], pinned, done))
    child.start()
    try:
        assert pinned.wait(60)
        fetcher.release(fetcher.fetch(sources[1]))  # over budget, and the only older shard is the child's pin
        assert os.path.exists(fetcher.local_path(sources[0]))
    finally:
        done.set()
        child.join(60)
    fetcher.release(fetcher.fetch(sources[2]))  # the pin is gone with its process: the least recently used leave
    assert not os.path.exists(fetcher.local_path(sources[0]))
    assert _shards(tmp_path / "cache") == [os.path.basename(fetcher.local_path(sources[2]))]


def _fetch_and_report(fetcher, source, out) -> None:
    path = fetcher.fetch(source)
    out.put(os.path.getsize(path))
    fetcher.release(path)


def test_processes_wanting_one_shard_at_once_download_it_once(tmp_path):
    """Workers that all read every shard (fewer shards than streams) or ranks sharing a cache ask for the same shard
    at once: one downloads it, the others wait and read its copy. A worker forked while its parent downloads waits
    for that download (the lock is not inherited)."""
    import multiprocessing

    shard = make_pair_shards(str(tmp_path / "data"), 2, 2)["files"][0]
    log = tmp_path / "downloads.log"
    source = f"pipe:echo x >> {log}; sleep 1; cat {shard}"
    fetcher = ShardFetcher(str(tmp_path / "cache"), 2**30)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    fetcher.prefetch(source)  # this process's download starts, then four workers fork and want the shard too
    children = [context.Process(target=_fetch_and_report, args=(fetcher, source, out)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert all(child.exitcode == 0 for child in children)
    assert [out.get(timeout=5) for _ in children] == [os.path.getsize(shard)] * 4
    assert log.read_text() == "x\n"


def test_data_inspect_fetches_remote_shards_into_the_options_cache(tmp_path, server, monkeypatch, capsys):
    """`flamingo data inspect --option remote_cache_dir=...` (with and without --kind) fetches there, never into
    the default cache."""
    from flamingo.cli import main

    root, url = server
    make_pair_shards(str(root), 6, 3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "default"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    pattern = url + "/shard-{000000..000001}.tar"
    for kind in (["--kind", "pairs"], []):
        cache = tmp_path / f"cache{len(kind)}"
        assert main(["data", "inspect", pattern, *kind, "--option", f"remote_cache_dir={cache}",
                     "--option", "remote_cache_gb=1"]) == 0
        assert '"samples": 6' in capsys.readouterr().out
        assert sorted(name.split("-", 1)[1] for name in _shards(cache)) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (tmp_path / "default").exists() and not (tmp_path / "home").exists()


def test_a_shard_cache_under_a_file_is_refused_naming_the_file(tmp_path, server, monkeypatch, capsys):
    """XDG_CACHE_HOME under a file: `data inspect` of remote shards ends with an error naming that file, not a bare
    `[Errno 20] Not a directory`."""
    from flamingo.cli import main

    root, url = server
    make_pair_shards(str(root), 2, 2)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    assert main(["data", "inspect", url + "/shard-000000.tar", "--kind", "pairs"]) != 0
    err = capsys.readouterr().err
    assert "remote_cache_dir" in err and repr(str(blocker)) in err


def test_a_remote_shard_fetched_again_keeps_its_waiting_records(tmp_path):
    """A remote shard's cached copy, evicted and fetched again, is a new file of the same bytes: the records still
    waiting for it (a shuffle buffer) read it, where the check for a local shard written again skipped them all as
    bad_shard once its open file had left the store."""
    import io
    import tarfile

    from flamingo.data import sources

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        for k in range(4):
            data = f"caption {k}".encode()
            info = tarfile.TarInfo(f"{k:04d}.txt")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    others = [str(tmp_path / f"other{j}.tar") for j in range(sources._MAX_OPEN_SHARDS)]
    for path in others:
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo("x.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))

    def evict() -> None:  # the shard's open file leaves the store of open shards
        for path in others:
            sources.open_shard(path)

    fetcher = ShardFetcher(str(tmp_path / "cache"), 2**30)
    source = f"pipe:cat {shard}"
    records = list(sources.read_records(source, fetcher=fetcher))
    read = [records[0].shard.read(records[0].payload["txt"])]
    os.remove(fetcher.local_path(source))  # evicted from the disk cache
    evict()
    read.append(records[1].shard.read(records[1].payload["txt"]))  # fetched again
    evict()
    read += [r.shard.read(r.payload["txt"]) for r in records[2:]]
    sources.close_open_shards()
    assert read == [f"caption {k}".encode() for k in range(4)]
