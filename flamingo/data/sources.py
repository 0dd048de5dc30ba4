"""Readers: a dataset path -> its files -> raw records (undecoded), and lazy references to the media they name.

Nothing here decodes an image or parses a document: a raw record is a JSONL line, a CSV row, or a group of tar members
(WebDataset convention: members sharing the key before the first dot of their basename), so that skipping records
(sharding, resuming) costs almost nothing. Media are read only when a sample is built.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, Optional

from PIL import Image

from ..processing import VIDEO_EXTENSIONS, animatable_image, default_max_pixels, image_frames
from ..runtime.lru import LRU
from ..runtime.media_formats import open_image
from ..runtime.text import bom_codec, file_encoding
from ..video import TooLong, decode_video
from .errors import SkipSample
from .remote import (
    TAR_SUFFIXES,
    FetchError,
    ShardFetcher,
    compression_of,
    decompress,
    default_fetcher,
    is_remote,
    list_hub_shards,
)
from .tars import read_members

TABLE_SUFFIXES = (".jsonl", ".csv", ".json")
# Tar members read as media, as a table's paths are: the image formats PIL decodes (an animated one is read as a
# video by content, `decode_frames`) and the video containers the processor reads.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
VIDEO_EXTS = tuple(ext.lstrip(".") for ext in VIDEO_EXTENSIONS)
# The csv module's default field limit (128 KiB) would end a file at its first long caption; this is its C maximum.
_CSV_FIELD_LIMIT = 2**31 - 1


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> three names (zero-padded like the first bound); `{x,y}` lists; nested left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + name for name in _expand_braces(tail)]
    return [name for item in items for name in _expand_braces(head + item + tail)]


def _directory_files(name: str) -> list[str]:
    """A directory's data files, sorted: its tar shards where it holds any (the sidecars a shard writer leaves next
    to them, img2dataset's `{shard}_stats.json` and `.parquet`, are no data: a table names its media by path, a shard
    carries its own), else its tables."""
    inside = sorted(os.path.join(name, f) for f in os.listdir(name)
                    if f.lower().endswith(TAR_SUFFIXES + TABLE_SUFFIXES))
    if not inside:
        raise ValueError(f"no data files (.tar, .jsonl, .csv, .json) in directory {name!r}")
    return [f for f in inside if is_tar(f)] or inside


def _check_json_table(path: str) -> None:
    """A `.json` table must hold a JSON list: one that does not (a tool's `{...}` summary named `.json`) is refused
    when the dataset is built, naming it, not when an epoch reaches it."""
    with open(path, encoding=file_encoding(path), errors="replace") as f:
        head = ""
        while not head and (chunk := f.read(4096)):
            head = chunk.lstrip()
    if not head.startswith("["):
        raise ValueError(f"{path!r} must hold a JSON list of records (it starts with {head[:20]!r}): leave it out of "
                         "the dataset path (a glob or brace pattern naming the data files) or convert it")


def expand_path(path: str) -> list[str]:
    """A file, a brace pattern, a glob, or a directory (its tar shards, else its tables, sorted) -> the list of data
    files. A name that exists is taken as it is before it is read as a glob (`pairs [v2].jsonl`). Local `.json`
    tables are checked to hold a list (`_check_json_table`). Remote tar shards (`https://`, `hf://datasets/...`,
    `pipe:`; data/remote.py) are listed by name or brace pattern, Hub ones also by glob or directory
    (`hf://datasets/org/name/train-*.tar`, `.../train/`: one listing call), and fetched when read. A path that is no
    string (or os.PathLike), e.g. a config's `path: null`, is a ValueError, not a file named `None`."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"a dataset path must be a file, directory, glob or brace pattern (a string), got {path!r}")
    path = os.fspath(path)
    files: list[str] = []
    remote = is_remote(path)
    for name in _expand_braces(path if remote else os.path.expanduser(path)):
        if name.startswith("hf://") and (name.endswith("/") or any(c in name for c in "*?[")):
            files.extend(list_hub_shards(name))
        elif remote:
            if not (name.startswith("pipe:") or is_tar(name.split("?", 1)[0])):
                raise ValueError(f"remote data must be tar shards ({', '.join(TAR_SUFFIXES)}), whose media travel with "
                                 f"them: {name!r}")
            files.append(name)
        elif os.path.isdir(name):
            files.extend(_directory_files(name))
        elif os.path.isfile(name):
            files.append(name)
        elif any(c in name for c in "*?["):
            files.extend(sorted(glob.glob(name)))
        else:
            raise ValueError(f"data file not found: {name!r} (from path {path!r})")
    if not files:
        raise ValueError(f"dataset path {path!r} matches no files")
    for file in files:
        if not is_remote(file) and file.lower().endswith(".json"):
            _check_json_table(file)
    return files


# --------------------------------------------------------------------------------------------------- tar shards
class _PreadView(io.RawIOBase):
    """A read-only view of a `_PlainCopy` with its own position (`os.pread`): views of one copy, in this process or a
    forked one, never move each other's offset. The copy lives as long as a view of it does."""

    def __init__(self, copy: "_PlainCopy") -> None:
        super().__init__()
        self._file, self._pos = copy.file, 0
        self._copy = copy

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._file.fileno(), len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos}.get(whence)
        self._pos = (os.fstat(self._file.fileno()).st_size if base is None else base) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


class _PlainCopy:
    """The uncompressed bytes of a compressed tar shard, decompressed once (64 KiB at a time) into an unnamed temporary
    file (under TMPDIR). Members are then read in any order at a plain tar's cost: a seek back in a gzip stream
    decompresses it again from its start, so reading a `.tar.gz` in place costs each member its offset. The space is
    freed when the last shard object holding the copy goes, or when the process ends (killed too: the file has no
    name); a forked worker reads its parent's copy through views of its own (`_PreadView`)."""

    def __init__(self, path: str, opener: Callable[..., IO[bytes]]) -> None:
        self.file = tempfile.TemporaryFile(prefix="flamingo-shard-", suffix=".tar")
        weakref.finalize(self, self.file.close)
        try:
            self.error = decompress(opener, path, self.file)  # why the stream broke off, or None
            self.file.flush()
        except OSError as e:
            self.file.close()
            raise RuntimeError(f"cannot decompress tar shard {path!r} into a temporary file under "
                               f"{tempfile.gettempdir()!r} ({e}): free space there or set TMPDIR to a disk with room "
                               "(or store the shard uncompressed)") from e

    def open(self) -> tarfile.TarFile:
        return tarfile.open(fileobj=io.BufferedReader(_PreadView(self)), mode="r:")


@dataclass
class TarShard:
    """The member index of one tar shard: WebDataset groups (in order), the members by a full name and by a basename
    that only one member has."""

    path: str
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]]  # (key, {ext: member})
    by_name: dict[str, tarfile.TarInfo]
    by_basename: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    error: Optional[str] = None  # set when the shard does not end as a tar ends (truncated or corrupt)
    cut: Optional[str] = None  # with `error`: the key of the group at the damage (left out of `groups`)
    # index in `groups` -> why: a group under a key an earlier group has (`a.jpg a.txt a.jpg a.txt`, split where an
    # extension repeats, or the key again further on); `read_records` counts it as `duplicate_key`, never reads it
    repeated: dict[int, str] = field(default_factory=dict)
    _file: Any = field(default=None, repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)  # the process whose file `_file` is
    # a compressed shard's uncompressed copy, read instead of `path`; it lives as long as this object
    _plain: Optional[_PlainCopy] = field(default=None, repr=False)
    # a remote shard's fetch (data/remote.py): its file may leave the shard cache while records still wait for it
    refetch: Optional[Callable[[], Any]] = field(default=None, repr=False)
    # the indexed file (`file_identity`): a file written again at the path (data packed again) is another shard
    identity: Optional[tuple[int, ...]] = field(default=None, repr=False)

    def _open_file(self) -> Any:
        """The shard's open file in this process. Records wait in a shuffle buffer longer than their shard stays
        open (at most `_MAX_OPEN_SHARDS` are), so a closed one opens again (its index still holds) and counts
        among the open shards; a shard open under the same path lends its file."""
        key = (os.getpid(), self.path)
        if self._file is not None and not self._file.closed and self._pid == key[0]:
            return self._file
        current = _OPEN_SHARDS.get(key)
        if current is not None and current.identity == self.identity:  # open (the store closes only what it evicts)
            self._file = current._file
        else:
            if self._plain is not None:
                self._file = self._plain.open()
            elif self.refetch is not None and not os.path.exists(self.path):
                self._file = self.refetch()  # the same bytes at the same path: the member index still holds
            else:  # a local shard written again has its members elsewhere; a remote one fetched again (a new file
                # of the same bytes: `refetch`) has them where they were
                now = file_identity(self.path)
                if self.refetch is None and None not in (now, self.identity) and now != self.identity:
                    raise OSError(f"{self.path!r} was written again since it was indexed")
                self._file = _open_tar(self.path)
            _OPEN_SHARDS.put(key, self)
        self._pid = key[0]
        return self._file

    def read(self, member: tarfile.TarInfo) -> bytes:
        try:
            with _SHARD_FILES:  # tarfile seeks, then reads, the file the readers of a path share (`_SHARD_FILES`)
                f = self._open_file().extractfile(member)
                data = f.read() if f is not None else None
        except Exception as e:  # a truncated shard fails here
            raise SkipSample("bad_shard", f"cannot read {member.name!r} from {self.path!r}: {e}") from e
        if data is None or len(data) != member.size:
            raise SkipSample("bad_shard", f"member {member.name!r} of {self.path!r} is cut short")
        return data

    def find(self, name: str, group: Optional[str] = None) -> Optional[tarfile.TarInfo]:
        """The member a record of `group` (its WebDataset key, `RawRecord.group`) means by `name`: one of its own
        group (`{group}/{name}`, `{group}.{name}`) first, then the member of that full name, then the one member with
        that basename. A name shared with the later, skipped samples of a repeated key (`repeated`) means the read
        sample's member; a name or basename several read samples share (`x/a.png`, `y/a.png`) names none of them:
        another record's image is never taken for this one's (the medium counts as `missing_file`)."""
        own = (f"{group}/{name}", f"{group}.{name}") if group else ()
        for candidate in (*own, name):
            member = self.by_name.get(candidate)
            if member is not None:
                return member
        return self.by_basename.get(os.path.basename(name))


def file_identity(path: str) -> Optional[tuple[int, ...]]:
    """(device, inode, size, modification time in ns) of the file at `path`, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _close(shard: TarShard) -> None:
    if shard._file is not None:
        shard._file.close()


_MAX_OPEN_SHARDS = 4
# Held while a shard's file is opened and read, and while the open shards close: the readers of a path in a process
# share one file (`_OPEN_SHARDS`), whose seek and read another thread's must not split (a record would get bytes of
# the right length from elsewhere in the shard), and an evicted shard's file closes under no reader
_SHARD_FILES = threading.RLock()
# (process id, path) -> the shard with its open file: a forked DataLoader worker never reads its parent's file object
_OPEN_SHARDS: LRU[tuple[int, str], TarShard] = LRU(max_size=_MAX_OPEN_SHARDS, on_evict=_close)


def close_open_shards() -> None:
    """Close this process's open tar shards: at the end of a stream's epoch, of `inspect` and of `detect_kind`, and
    in a forked child (which would otherwise hold its parent's files, in slots of its own store, until it exits).
    All of them, another stream's in this process too: records still waiting for a closed shard open it again
    (`TarShard._open_file`; a compressed one's copy stays with its shard object, so that costs an open, no
    decompression)."""
    with _SHARD_FILES:
        _OPEN_SHARDS.clear()


def _after_fork_in_child() -> None:
    """A forked child's shards: its parent's files closed. The fork happened holding `_SHARD_FILES`, so no other
    thread of the parent was inside a read (a file's own lock held by a thread the child, which has one thread, does
    not have would hang its close) nor is left holding it."""
    _SHARD_FILES.release()
    close_open_shards()


if hasattr(os, "register_at_fork"):  # (no fork on Windows)
    os.register_at_fork(before=_SHARD_FILES.acquire, after_in_parent=_SHARD_FILES.release,
                        after_in_child=_after_fork_in_child)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    dirname, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(dirname, stem) if dirname else stem), ext.lower()


def _open_tar(path: str) -> tarfile.TarFile:
    return tarfile.open(path, "r:")


def _index(path: str) -> tuple[Any, Optional[_PlainCopy], list[tarfile.TarInfo], Optional[str]]:
    """(open file, uncompressed copy of a compressed shard, file members, why the shard is damaged or None)."""
    tf, plain, error = None, None, None
    try:
        opener = compression_of(path)
        if opener is not None:
            plain = _PlainCopy(path, opener)
            error = plain.error
        tf = plain.open() if plain is not None else _open_tar(path)
    except (tarfile.TarError, OSError, EOFError) as e:
        return None, plain, [], error or f"{type(e).__name__}: {e}"
    members, end_error = read_members(tf)
    return tf, plain, members, error or end_error


def _unique_names(members: list[tarfile.TarInfo], name_of: Callable[[tarfile.TarInfo], str],
                  kept: set[int]) -> dict[str, tarfile.TarInfo]:
    """name -> the one member it means: the member of a sample that is read (`kept`: their ids) where one has the
    name, else the only member that has it; a name several such members share means none."""
    found: dict[str, list[tarfile.TarInfo]] = {}
    for m in members:
        found.setdefault(name_of(m), []).append(m)
    index: dict[str, tarfile.TarInfo] = {}
    for name, holders in found.items():
        read = [m for m in holders if id(m) in kept] or holders
        if len(read) == 1:
            index[name] = read[0]
    return index


def open_shard(path: str) -> TarShard:
    """Index a tar shard (member headers only), cached per process (forked DataLoader workers reopen theirs). A
    compressed one (gzip, bzip2, xz) is decompressed once first (`_PlainCopy`). A damaged one (truncated, corrupt:
    `tars.read_members`) is warned about, and its last group, the sample at the damage, is left out: `read_records`
    counts it as `bad_shard`. Members are grouped as WebDataset groups them: consecutive members sharing a key, a
    new group where the key changes or an extension repeats. A key that comes again (`a.jpg a.txt a.jpg a.txt`: a
    sample appended again, a re-run writer; or further on in the shard) keeps its first group as the sample; each
    later group is marked (`repeated`) for `read_records` to count as `duplicate_key`, never read, and a member name
    it shares with a read sample's member means that one (`find`): two samples' members are never merged. A file
    written again at the path since it was cached (data packed again in a long-lived process) is indexed again."""
    cache_key = (os.getpid(), path)
    shard = _OPEN_SHARDS.get(cache_key)
    identity = file_identity(path)
    if shard is not None and (identity is None or identity == shard.identity):  # gone: a remote shard refetches it
        return shard
    tf, plain, members, error = _index(path)
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    repeated: dict[int, str] = {}
    seen: set[str] = set()  # keys that have a group (their first: the one read)
    for m in members:
        key, ext = split_member_name(m.name)
        if not groups or groups[-1][0] != key or ext in groups[-1][1]:
            if key in seen:
                repeated[len(groups)] = f"key {key!r} comes again at member {m.name!r}"
            seen.add(key)
            groups.append((key, {}))
        groups[-1][1][ext] = m
    kept = {id(m) for i, (_, group) in enumerate(groups) if i not in repeated for m in group.values()}
    cut = None
    if error is not None:
        cut = groups.pop()[0] if groups else "(start)"
        repeated.pop(len(groups), None)
        warnings.warn(f"tar shard {path!r} is damaged after {len(members)} members ({error}): the sample there "
                      f"and any after it are skipped (counted as bad_shard)", stacklevel=2)
    by_name = _unique_names(members, lambda m: m.name, kept)
    by_basename = _unique_names(members, lambda m: os.path.basename(m.name), kept)
    shard = TarShard(path, groups, by_name, by_basename, error, cut, repeated, _file=tf, _plain=plain,
                     identity=identity)
    with _SHARD_FILES:  # the put may evict, and close, a shard another thread is reading
        _OPEN_SHARDS.put(cache_key, shard)
    return shard


# --------------------------------------------------------------------------------------------------- records
@dataclass
class RawRecord:
    """One undecoded sample. `payload`: a JSONL line (str), a CSV/JSON row (dict) or a tar group ({ext: member})."""

    key: str
    file: str
    payload: Any
    shard: Optional[TarShard] = None  # for tar records
    # (reason, detail) of a stand-in for what a damaged file lost (a tar shard's cut, a CSV row past a parse error):
    # counted as skipped by `check`, never built (its payload is empty)
    lost: Optional[tuple[str, str]] = None

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.file))

    @property
    def group(self) -> Optional[str]:
        """A tar record's WebDataset key (the name its members share before their extensions); None otherwise."""
        member = next(iter(self.payload.values()), None) if self.shard is not None else None
        return split_member_name(member.name)[0] if member is not None else None

    def check(self) -> None:
        """Raise SkipSample for a stand-in of lost data (`lost`); readers call it before building a sample."""
        if self.lost is not None:
            raise SkipSample(*self.lost)


def _fetched(fetcher: ShardFetcher, source: str, open_file: Callable[[str], Any]) -> Any:
    """`open_file` of the remote shard `source`, fetched into the cache: opened before the cache may evict it (an
    open file stays readable)."""
    local = fetcher.fetch(source)
    try:
        return open_file(local)
    finally:
        fetcher.release(local)


def read_records(path: str, tar_needs: Optional[str] = None,
                 fetcher: Optional[ShardFetcher] = None) -> Iterator[RawRecord]:
    """The raw records of one data file, in file order. `tar_needs`: keep only tar groups with that member extension
    (interleaved shards: `json`, the documents; their images are separate members found by name). A remote shard is
    fetched first (by `fetcher`, else into the default cache); one that cannot be fetched is skipped with a
    warning, like a shard unreadable from its start. What a damaged file lost comes as stand-in records (`lost`) to
    count."""
    name = os.path.basename(path.split("?", 1)[0].rstrip(" -") if is_remote(path) else path)
    low = path.lower()
    if is_remote(path) or is_tar(path):
        if is_remote(path):
            fetcher = fetcher or default_fetcher()
            try:
                shard = _fetched(fetcher, path, open_shard)
            except FetchError as e:
                warnings.warn(f"remote shard could not be fetched ({e}): its samples are skipped (counted as "
                              "bad_shard)", stacklevel=2)
                yield RawRecord(f"{name}:(fetch)", path, {}, lost=("bad_shard", f"cannot fetch {e}"))
                return
            shard.refetch = functools.partial(_fetched, fetcher, path, _open_tar)
        else:
            shard = open_shard(path)
        repeated = [why for i, why in shard.repeated.items() if tar_needs is None or tar_needs in shard.groups[i][1]]
        if repeated:
            warnings.warn(f"tar shard {path!r} holds {len(repeated)} sample(s) under a key an earlier sample has "
                          f"({repeated[0]}): each key's first sample is read, the later ones skipped (counted as "
                          "duplicate_key)", stacklevel=2)
        for i, (key, members) in enumerate(shard.groups):
            if tar_needs is None or tar_needs in members:
                if i in shard.repeated:
                    why = ("duplicate_key", f"{path}: {shard.repeated[i]}")
                    yield RawRecord(f"{name}:{key}", path, {}, shard, lost=why)
                else:
                    yield RawRecord(f"{name}:{key}", path, members, shard)
        if shard.error is not None:
            yield RawRecord(f"{name}:{shard.cut}", path, {}, shard, lost=("bad_shard", f"{path}: {shard.error}"))
    elif low.endswith(".jsonl"):  # (a byte-order mark, as Excel and Notepad write, is not data)
        with open(path, encoding=file_encoding(path), errors="replace") as f:
            for i, line in enumerate(f, 1):  # keyed by line number, as an editor counts them
                if line.strip():
                    yield RawRecord(f"{name}:{i}", path, line)
    elif low.endswith(".csv"):
        yield from _csv_records(path, name)
    elif low.endswith(".json"):
        with open(path, encoding=file_encoding(path), errors="replace") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path!r} is not valid JSON ({e}); use JSONL for one record per line") from e
        if not isinstance(rows, list):
            raise ValueError(f"{path!r} must hold a JSON list of records")
        for i, row in enumerate(rows):
            yield RawRecord(f"{name}:{i}", path, row)
    else:
        raise ValueError(f"unsupported data file {path!r}: expected .tar, .jsonl, .csv or .json")


class _Lines:
    """A text file's lines, counted as a csv reader takes them (its own `line_num` stops short at a parse error)."""

    def __init__(self, file: IO[str]) -> None:
        self.file, self.taken = file, 0

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        line = next(self.file)
        self.taken += 1
        return line


def _csv_records(path: str, name: str) -> Iterator[RawRecord]:
    """The rows of a CSV file. Read strictly: a quote left open would otherwise take the rest of the file into one
    field. Where the parser cannot go on, each line from the failed row on stands for a lost row, counted as
    `bad_record` (and the file is warned about, with the line)."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with open(path, newline="", encoding=file_encoding(path), errors="replace") as f:
        lines = _Lines(f)
        line = 0  # the line the header or the last row read ended on
        try:
            reader = csv.DictReader(lines, strict=True)
            if reader.fieldnames is not None:  # (reads the header)
                line = lines.taken
            for row in reader:
                line = lines.taken
                yield RawRecord(f"{name}:{line}", path, row)  # keyed by the line the row ends on (header: line 1)
        except csv.Error as e:
            lost = max(1, lines.taken - line) + sum(1 for rest in f if rest.strip())
            warnings.warn(f"CSV file {path!r} is malformed after line {line} ({e}): its remaining {lost} line(s) "
                          "are skipped (counted as bad_record)", stacklevel=2)
            detail = f"{path}: malformed CSV after line {line} ({e})"
            for k in range(lost):
                yield RawRecord(f"{name}:{line + 1 + k}", path, {}, lost=("bad_record", detail))


def decode_text(data: bytes) -> str:
    """A text member's or file's bytes -> str: UTF-8, or the UTF-16 / UTF-32 a byte-order mark announces (Windows
    Notepad's "Unicode" is UTF-16 LE with one); broken bytes become U+FFFD."""
    return data.decode(bom_codec(data, "utf-8"), errors="replace")


def caption_text(data: bytes, where: str) -> str:
    """A caption file's bytes (a tar `.txt` member, `pack --images`' `.txt` files) -> str (`decode_text`), or
    SkipSample('bad_record') for text holding NUL: no caption does, UTF-16 without a byte-order mark and binary files
    do, and they would be trained as `a\\0 \\0p\\0h...`."""
    text = decode_text(data)
    if "\0" in text:
        raise SkipSample("bad_record", f"{where}: the caption holds NUL characters: not UTF-8 text (UTF-16 without a "
                                       "byte-order mark?); save it as UTF-8")
    return text


def parse_json_record(text: Any, where: str) -> dict[str, Any]:
    """A JSONL line / .json member -> dict, or SkipSample('bad_json')."""
    if isinstance(text, bytes):
        text = decode_text(text)
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise SkipSample("bad_json", f"{where}: {e}") from e
    if not isinstance(value, dict):
        raise SkipSample("bad_json", f"{where}: a record must be a JSON object, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------- media
@dataclass
class MediaRef:
    """A medium named by a record, read only when needed (skipped records never touch their media)."""

    name: str
    read: Callable[[], bytes]
    video: bool = False
    # A stable identity (path, or shard:member) under which options.cache_media_mib keeps it; None: never cached.
    cache_key: Optional[str] = None

    def load(self, fps: float = 1.0, max_frames: int = 8) -> list[Image.Image]:
        """-> RGB frames (one for an image); SkipSample('missing_file' | 'bad_image' | 'bad_video', by the slot it
        fills) on failure. A GIF, PNG or WebP named as a video is read as the image (animation) it is, as the
        processor and the server read it (`animatable_image`)."""
        data = self.read()
        if self.video and not animatable_image(data):
            try:
                return decode_video(data, fps=fps, max_frames=max_frames, max_pixels=default_max_pixels())
            except ValueError as e:
                raise SkipSample("bad_video", f"{self.name}: {e}") from e
        return decode_frames(data, self.name, fps, max_frames, bad="bad_video" if self.video else "bad_image")


def decode_frames(data: bytes, name: str, fps: float = 1.0, max_frames: int = 8,
                  bad: str = "bad_image") -> list[Image.Image]:
    """An image file's bytes -> its frames: one for a still, an animation's as a video's (`image_frames`, under
    `default_max_pixels`: each frame by its header, an animation's frames x canvas by its frame count, before any is
    decoded); SkipSample(`bad`) when they do not decode or are refused."""
    try:
        with open_image(io.BytesIO(data)) as im:  # (no Pillow warning before the refusal by the size)
            return image_frames(im, fps, max_frames, max_pixels=default_max_pixels())
    except TooLong as e:
        raise SkipSample(bad, f"{name}: an animation {e}") from e
    except Exception as e:  # PIL raises several types for corrupt bytes
        raise SkipSample(bad, f"{name}: {type(e).__name__}: {e}") from e


def read_media_file(path: str) -> bytes:
    """A medium's file -> its bytes, or SkipSample('missing_file') where no regular file has that name: none exists,
    it is a directory, FIFO, device or socket (a stat says so before opening: a FIFO's read would wait forever, a
    device's never end), or the name can be no file's (a NUL byte, half a UTF-16 surrogate pair: named by repr)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SkipSample("missing_file", f"{path}: not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SkipSample("missing_file", f"{path}: {e}") from e
    except ValueError as e:  # open's `embedded null byte`, a UnicodeEncodeError for a lone surrogate
        raise SkipSample("missing_file", f"{path!r}: no file can have this name ({e})") from e


def file_ref(path: str, video: bool = False) -> MediaRef:
    return MediaRef(path, functools.partial(read_media_file, path), video, cache_key=os.path.abspath(path))


def member_ref(shard: TarShard, member: tarfile.TarInfo, video: bool = False) -> MediaRef:
    name = f"{shard.path}:{member.name}"
    return MediaRef(name, lambda: shard.read(member), video, cache_key=f"{os.path.abspath(shard.path)}:{member.name}")


def bytes_ref(data: bytes, name: str, video: bool = False) -> MediaRef:
    return MediaRef(name, lambda: data, video)


def resolve_relative(base_dir: str, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(base_dir, rel)
