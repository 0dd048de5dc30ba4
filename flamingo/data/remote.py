"""Remote tar shards: named by URL (`https://...`, `http://...`), on the Hugging Face Hub
(`hf://datasets/org/name/path/shard-000.tar`, or `hf://datasets/org/name@revision/...`), or by a command whose output
is the shard (WebDataset's `pipe:`, e.g. `pipe:aws s3 cp s3://bucket/shard-000.tar -`). A shard is fetched whole into
a local cache bounded in bytes, then read like a local one (its member index, random access, exact resume). The
shard a stream reads next is fetched in the background while it reads the current one. A compressed shard (gzip,
bzip2 or xz, told by its bytes) is cached decompressed: members are read in any order, and a seek back in a compressed
stream would decompress it again from its start.

The cache holds the least recently used shards up to `max_bytes` (shared by the processes that use one directory);
it should hold at least two shards per DataLoader worker, or a prefetched shard may be evicted before it is read and
fetched again. A shard between its fetch and its opening is pinned: a shared `flock` on it, which every process's
eviction respects (it removes a shard only under an exclusive lock), so no process removes a shard another is about
to open. A shard is downloaded by one process at a time (a lock file per shard under `.fetching/`): processes that
want it meanwhile (DataLoader workers that all read every shard, when there are fewer shards than streams; ranks
sharing the cache) wait for that download and read its copy.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import http.client
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Optional

from ..runtime.checkpoint_io import blocking_file
from ..runtime.hub import HF_DATASET

try:
    import fcntl  # the cache's locks: POSIX only
except ImportError:  # Windows: local data reads; remote shards are refused when a dataset names them
    fcntl = None  # type: ignore[assignment]
from .tars import tar_check

REMOTE_PREFIXES = ("http://", "https://", "hf://", "pipe:")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_LOCKS: dict[str, threading.Lock] = {}  # per URL, in this process: one fetch at a time (the prefetch and the read)
_PINNED: dict[str, int] = {}  # cached paths between `fetch` and `release` in this process: never evicted by it
_PIN_FDS: dict[str, list[int]] = {}  # the descriptors holding their shared locks (seen by other processes)
_LOCKS_GUARD = threading.Lock()
# Held while a `pipe:` command starts, and by `os.fork` (a DataLoader worker starting): a process forked meanwhile
# would inherit the write end of subprocess's exec-error pipe, and the starting thread would wait for it (holding the
# shard's download lock) as long as that process lives, while the process waits for the shard.
_SPAWN_LOCK = threading.Lock()


def _reset_after_fork() -> None:
    """A forked DataLoader worker starts with fresh locks and pins: a lock a parent's prefetch thread held at the
    fork would stay locked in the child forever, and a pin's inherited descriptor would keep the parent's shared
    lock alive after the parent released it."""
    global _LOCKS_GUARD, _SPAWN_LOCK
    for fds in _PIN_FDS.values():
        for fd in fds:
            os.close(fd)
    _PIN_FDS.clear()
    _LOCKS.clear()
    _PINNED.clear()
    _LOCKS_GUARD = threading.Lock()
    _SPAWN_LOCK = threading.Lock()


def _pin_file(path: str) -> Optional[int]:
    """A descriptor of the cached shard `path` holding a shared lock on it (no eviction removes it meanwhile), or
    None when another process removed it before the lock was taken."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while an eviction holds the exclusive lock (a moment)
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # removed (and maybe fetched again) between the open and the lock
        os.close(fd)
        return None
    return fd


if hasattr(os, "register_at_fork"):  # (no fork on Windows)
    os.register_at_fork(before=lambda: _SPAWN_LOCK.acquire(), after_in_parent=lambda: _SPAWN_LOCK.release(),
                        after_in_child=_reset_after_fork)


@contextlib.contextmanager
def _download_lock(path: str) -> Iterator[None]:
    """Held by one process at a time per cached shard `path`: a POSIX record lock (`lockf`), which a forked child does
    not inherit, so a worker forked while its parent downloads waits for that download instead of deadlocking."""
    directory = os.path.join(os.path.dirname(path), ".fetching")
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, os.path.basename(path)), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale_parts(path: str) -> None:
    """Remove the partial downloads of `path` that other processes left (killed mid-download: a preempted job, an
    OOM-killed worker), which nothing else would delete and the cache's size does not count. Called under the
    download lock, which no other process holds then; this process's other threads may be downloading: theirs stay."""
    prefix = os.path.basename(path) + ".part-"
    mine = f"{prefix}{os.getpid()}-"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(os.path.dirname(path)):
            if entry.name.startswith(prefix) and not entry.name.startswith(mine):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_PREFIXES)


DEFAULT_CACHE_GB = 20.0
_PIN_ATTEMPTS = 3  # fetches of a shard other processes keep evicting before it can be pinned


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flamingo", "shards")


def default_fetcher() -> "ShardFetcher":
    """The fetcher of a dataset whose options name no cache: `default_cache_dir()` (`$XDG_CACHE_HOME/flamingo/shards`,
    `~/.cache/flamingo/shards` without it), `DEFAULT_CACHE_GB`."""
    return ShardFetcher(default_cache_dir(), int(DEFAULT_CACHE_GB * 2**30))


def hub_url(path: str) -> tuple[str, dict[str, str]]:
    """`hf://datasets/org/name[@revision]/file` -> its download URL on the Hub (`HF_ENDPOINT`) and the headers that
    carry the user's token (`hf auth login` or `HF_TOKEN`), when there is one (huggingface_hub's own)."""
    m = HF_DATASET.match(path)
    if m is None or not m.group(3):
        raise ValueError(f"{path!r}: a Hub shard is hf://datasets/ORG/NAME[@REVISION]/PATH")
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(m.group(1), m.group(3), repo_type="dataset", revision=m.group(2) or "main",
                     endpoint=os.environ.get("HF_ENDPOINT"))  # as set now (huggingface_hub read it at import)
    return url, build_hf_headers(library_name="flamingo")


def _glob_regex(pattern: str) -> re.Pattern:
    """A path glob -> its regex: `*` and `?` stay inside one directory, `**` crosses them, `[...]` is a class."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1:j].replace("!", "^", 1) + "]", j + 1
            continue
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def list_hub_shards(path: str) -> list[str]:
    """`hf://datasets/org/name[@revision]/dir/` (its tar shards, at any depth) or `.../train-*.tar` (a glob) -> the
    `hf://` paths of the matching tar shards in the repository, sorted: one listing call to the Hub."""
    m = HF_DATASET.match(path)
    if m is None:
        raise ValueError(f"{path!r}: Hub shards are hf://datasets/ORG/NAME[@REVISION]/PATH")
    from huggingface_hub import HfApi

    repo, revision, pattern = m.group(1), m.group(2), m.group(3) or ""
    if not pattern or pattern.endswith("/"):  # a folder (or the repository): its shards at any depth
        pattern += "**"
    files = HfApi(endpoint=os.environ.get("HF_ENDPOINT")).list_repo_files(repo, repo_type="dataset",
                                                                           revision=revision or "main")
    match = _glob_regex(pattern)
    prefix = f"hf://datasets/{repo}" + (f"@{revision}" if revision else "") + "/"
    found = sorted(prefix + f for f in files if match.match(f) and f.lower().endswith(TAR_SUFFIXES))
    if not found:
        raise ValueError(f"no tar shards ({', '.join(TAR_SUFFIXES)}) match {path!r} in the Hub dataset {repo}")
    return found


def compression_of(path: str) -> Optional[Callable[..., IO[bytes]]]:
    """The opener (`gzip.open`, `bz2.open`, `lzma.open`) of a compressed file, told by its first bytes as tarfile's
    `r:*` tells them (a name proves nothing: a cached `.tar.gz` holds a plain tar); None for an uncompressed one."""
    with open(path, "rb") as f:
        head = f.read(10)
    if head.startswith(b"\x1f\x8b"):
        return gzip.open
    if head.startswith(b"BZh") and head[4:10] == b"1AY&SY":  # (with the block magic: a tar member may be "BZh...")
        return bz2.open
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.open
    return None


def decompress(opener: Callable[..., IO[bytes]], path: str, out: IO[bytes]) -> Optional[str]:
    """Write the decompressed bytes of `path` to `out`, 64 KiB at a time: memory stays bounded whatever the size, and
    a compressed stream that breaks off loses at most that much before the break. Returns None, or why the stream
    broke off (what came before the break is written); a failed write (a full disk) raises."""
    try:
        source = opener(path, "rb")
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    with source:
        while True:
            try:
                chunk = source.read1(1 << 16)  # (`read` would drop what it read before an error)
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
                return f"cannot decompress past byte {out.tell()} ({type(e).__name__}: {e})"
            if not chunk:
                return None
            out.write(chunk)


def _decompress_in_place(path: str) -> None:
    """A fetched shard that is compressed becomes its plain tar. One whose stream breaks off stays as fetched: the
    reader decompresses what it can and reports the break (sources.open_shard)."""
    opener = compression_of(path)
    if opener is None:
        return
    plain = path + ".tar"  # a `.part-` name still: no eviction counts or takes it
    try:
        with open(plain, "wb") as out:
            error = decompress(opener, path, out)
        if error is None:
            os.replace(plain, path)
    finally:
        if os.path.exists(plain):
            os.remove(plain)


def _touch(path: str) -> bool:
    """Whether the shard `path` is cached; if so it becomes the most recently used."""
    try:
        os.utime(path)
        return True
    except (FileNotFoundError, NotADirectoryError):  # (the latter: a part of the cache's path is a file)
        return False


class FetchError(Exception):
    """A shard that could not be fetched (after retries)."""


@dataclass(frozen=True)
class ShardFetcher:
    """Fetches remote shards into `cache_dir`, keeping at most `max_bytes` there. Picklable (sent to workers)."""

    cache_dir: str
    max_bytes: int
    retries: int = 3  # attempts per shard, with 1 s, 2 s, ... between them
    timeout: float = 60.0  # seconds without data before an HTTP attempt fails

    def __post_init__(self) -> None:
        if fcntl is None:
            raise ValueError("remote shards are cached under POSIX file locks (fcntl), which this platform lacks "
                             "(Windows): download the shards and name the local files")

    def local_path(self, source: str) -> str:
        """Where `source` is cached: a name from its digest (distinct sources never collide) and its basename."""
        digest = hashlib.sha256(source.encode()).hexdigest()[:20]
        tail = re.sub(r"[^\w.-]", "_", source.rstrip(" -").rsplit("/", 1)[-1])[-60:]
        return os.path.join(self.cache_dir, f"{digest}-{tail}")

    def fetch(self, source: str) -> str:
        """The local path of the shard `source`, fetched now unless cached (then marked as just used), pinned: this
        process's evictions leave it alone until `release(path)` (call it once the shard is open). Raises
        FetchError with the last failure when every attempt fails."""
        path = self.local_path(source)
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(source, threading.Lock())
            _PINNED[path] = _PINNED.get(path, 0) + 1  # before the file is looked at: no eviction takes it after
        try:
            for _ in range(_PIN_ATTEMPTS):
                with lock:
                    self._ensure(source, path)
                fd = _pin_file(path)
                if fd is not None:
                    break
            else:
                raise FetchError(f"{source}: other processes evicted it {_PIN_ATTEMPTS} times as soon as it was "
                                 "fetched: the shard cache is too small for the processes sharing it")
        except BaseException:
            self._unpin(path)
            raise
        with _LOCKS_GUARD:
            _PIN_FDS.setdefault(path, []).append(fd)
        self._evict(keep=path)
        return path

    def release(self, path: str) -> None:
        """Unpin a path `fetch` returned."""
        with _LOCKS_GUARD:
            fds = _PIN_FDS.get(path)
            fd = fds.pop() if fds else None
            if fds == []:
                del _PIN_FDS[path]
        if fd is not None:
            os.close(fd)  # releases its shared lock
        self._unpin(path)

    @staticmethod
    def _unpin(path: str) -> None:
        with _LOCKS_GUARD:
            _PINNED[path] -= 1
            if not _PINNED[path]:
                del _PINNED[path]

    def _ensure(self, source: str, path: str) -> None:
        if _touch(path):
            return
        blocking = blocking_file(self.cache_dir)
        if blocking is not None:
            raise ValueError(f"the shard cache {self.cache_dir!r} cannot be a directory: {blocking!r} is a file (set "
                             "the dataset's remote_cache_dir, or XDG_CACHE_HOME, to a directory)")
        os.makedirs(self.cache_dir, exist_ok=True)
        with _download_lock(path):
            if not _touch(path):  # (another process may have fetched it while this one waited)
                self._download_with_retries(source, path)

    def _download_with_retries(self, source: str, path: str) -> None:
        _remove_stale_parts(path)
        error: Optional[Exception] = None
        for attempt in range(max(1, self.retries)):
            if attempt:
                time.sleep(attempt)
            part = f"{path}.part-{os.getpid()}-{threading.get_ident()}"
            try:
                whole = self._download(source, part)
                _decompress_in_place(part)
                members, damage = tar_check(part)
                # no tar at all (a page a proxy sent) is a failed attempt; so is a cut one whose length nothing
                # vouched for (a body cut short without a Content-Length), but for the last attempt: cut the same way
                # each time, it is the origin's file, kept and read as a local one is, to its damage
                cut_here = not whole and attempt < max(1, self.retries) - 1
                if damage is not None and (members == 0 or cut_here):
                    raise ValueError(f"the download is not a whole tar shard: {damage}")
                os.replace(part, path)  # atomic: readers see a whole shard or none
                return
            except (OSError, http.client.HTTPException, subprocess.SubprocessError, ValueError) as e:
                error = e
                if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # the request itself is wrong (missing, forbidden): another attempt fails alike
            finally:
                if os.path.exists(part):
                    os.remove(part)
        raise FetchError(f"{source}: {type(error).__name__}: {error}")

    def prefetch(self, source: str) -> None:
        """Fetch `source` in a background thread (a failure is left for the read to report)."""
        def run() -> None:
            try:
                self.release(self.fetch(source))
            except FetchError:
                pass

        threading.Thread(target=run, name="flamingo-shard-prefetch", daemon=True).start()

    def _download(self, source: str, part: str) -> bool:
        """Write `source` to `part`; True when its length was vouched for (a Content-Length it has)."""
        if source.startswith("pipe:"):
            with open(part, "wb") as out, tempfile.TemporaryFile() as errors:  # (no pipe a fork could inherit)
                with _SPAWN_LOCK:
                    process = subprocess.Popen(source[len("pipe:"):], shell=True, stdout=out, stderr=errors)
                code = process.wait()
                errors.seek(0)
                message = errors.read().decode(errors="replace").strip()[-300:]
            if code != 0:
                raise subprocess.SubprocessError(f"exit status {code}: {message}")
            return False
        url, headers = hub_url(source) if source.startswith("hf://") else (source, {})
        request = urllib.request.Request(url, headers={"user-agent": "flamingo", **headers})
        with urllib.request.urlopen(request, timeout=self.timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
            expected = response.headers.get("content-length")
        if expected is not None and os.path.getsize(part) != int(expected):
            raise OSError(f"got {os.path.getsize(part)} of {expected} bytes")
        return expected is not None

    def _evict(self, keep: str) -> None:
        """Remove the least recently used shards until the cache fits `max_bytes` (never `keep`; files other
        processes are still writing are not shards yet; a removed shard stays readable by whoever has it open)."""
        try:
            entries = [e for e in os.scandir(self.cache_dir) if e.is_file() and ".part-" not in e.name]
            stats = sorted(((e.stat().st_mtime, e.stat().st_size, e.path) for e in entries))
        except FileNotFoundError:  # another process emptied it
            return
        total = sum(size for _, size, _ in stats)
        for _, size, path in stats:
            if total <= self.max_bytes:
                break
            if path == keep or path in _PINNED:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # removed by another process
                total -= size
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # pinned by another process: it is about to open it
                os.close(fd)
                continue
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
            total -= size
