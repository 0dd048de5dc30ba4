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
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from PIL import Image

from ..processing import image_frames
from ..runtime.lru import LRU
from ..video import decode_video
from .errors import SkipSample
from .remote import TAR_SUFFIXES, FetchError, ShardFetcher, default_fetcher, is_remote, list_hub_shards

TABLE_SUFFIXES = (".jsonl", ".csv", ".json")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv")


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


def expand_path(path: str) -> list[str]:
    """A file, a brace pattern, a glob, or a directory (its data files, sorted) -> the list of data files. Remote
    tar shards (`https://`, `hf://datasets/...`, `pipe:`; data/remote.py) are listed by name or brace pattern, Hub
    ones also by glob or directory (`hf://datasets/org/name/train-*.tar`, `.../train/`: one listing call), and
    fetched when read."""
    files: list[str] = []
    remote = is_remote(str(path))
    for name in _expand_braces(str(path) if remote else os.path.expanduser(str(path))):
        if name.startswith("hf://") and (name.endswith("/") or any(c in name for c in "*?[")):
            files.extend(list_hub_shards(name))
        elif remote:
            if not (name.startswith("pipe:") or is_tar(name.split("?", 1)[0])):
                raise ValueError(f"remote data must be tar shards (.tar, .tar.gz, .tgz), whose media travel with "
                                 f"them: {name!r}")
            files.append(name)
        elif os.path.isdir(name):
            inside = sorted(os.path.join(name, f) for f in os.listdir(name)
                            if f.lower().endswith(TAR_SUFFIXES + TABLE_SUFFIXES))
            if not inside:
                raise ValueError(f"no data files (.tar, .jsonl, .csv, .json) in directory {name!r}")
            files.extend(inside)
        elif any(c in name for c in "*?["):
            files.extend(sorted(glob.glob(name)))
        elif os.path.isfile(name):
            files.append(name)
        else:
            raise ValueError(f"data file not found: {name!r} (from path {path!r})")
    if not files:
        raise ValueError(f"dataset path {path!r} matches no files")
    return files


# --------------------------------------------------------------------------------------------------- tar shards
@dataclass
class TarShard:
    """The member index of one tar shard: WebDataset groups (in order) and a name -> member map."""

    path: str
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]]  # (key, {ext: member})
    by_name: dict[str, tarfile.TarInfo]
    error: Optional[str] = None  # set when the shard could not be read to its end
    _file: Any = field(default=None, repr=False)
    _pid: int = field(default_factory=os.getpid, repr=False)  # the process whose file `_file` is
    # a remote shard's fetch (data/remote.py): its file may leave the shard cache while records still wait for it
    refetch: Optional[Callable[[], Any]] = field(default=None, repr=False)

    def _open_file(self) -> Any:
        """The shard's open file in this process. Records wait in a shuffle buffer longer than their shard stays
        open (at most `_MAX_OPEN_SHARDS` are), so a closed one opens again (its index still holds) and counts
        among the open shards; a shard open under the same path lends its file."""
        key = (os.getpid(), self.path)
        if self._file is not None and not self._file.closed and self._pid == key[0]:
            return self._file
        current = _OPEN_SHARDS.get(key)
        if current is not None:  # open (the store closes only what it evicts)
            self._file = current._file
        else:
            if self.refetch is not None and not os.path.exists(self.path):
                self._file = self.refetch()  # the same bytes at the same path: the member index still holds
            else:
                self._file = _open_tar(self.path)
            _OPEN_SHARDS.put(key, self)
        self._pid = key[0]
        return self._file

    def read(self, member: tarfile.TarInfo) -> bytes:
        try:
            f = self._open_file().extractfile(member)
            data = f.read() if f is not None else None
        except Exception as e:  # a truncated shard fails here
            raise SkipSample("bad_shard", f"cannot read {member.name!r} from {self.path!r}: {e}") from e
        if data is None or len(data) != member.size:
            raise SkipSample("bad_shard", f"member {member.name!r} of {self.path!r} is cut short")
        return data

    def find(self, name: str) -> Optional[tarfile.TarInfo]:
        return self.by_name.get(name) or self.by_name.get(os.path.basename(name))


def _close(shard: TarShard) -> None:
    if shard._file is not None:
        shard._file.close()


_MAX_OPEN_SHARDS = 4
# (process id, path) -> the shard with its open file: a forked DataLoader worker never reads its parent's file object
_OPEN_SHARDS: LRU[tuple[int, str], TarShard] = LRU(max_size=_MAX_OPEN_SHARDS, on_evict=_close)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    dirname, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (os.path.join(dirname, stem) if dirname else stem), ext.lower()


def open_shard(path: str) -> TarShard:
    """Index a tar shard (member headers only), cached per process (forked DataLoader workers reopen theirs)."""
    cache_key = (os.getpid(), path)
    shard = _OPEN_SHARDS.get(cache_key)
    if shard is not None:
        return shard
    members: list[tarfile.TarInfo] = []
    error = None
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        tf, error = None, f"{type(e).__name__}: {e}"
    else:
        try:
            for m in tf:
                if m.isfile():
                    members.append(m)
        except (tarfile.TarError, OSError, EOFError) as e:
            error = f"{type(e).__name__}: {e}"
    if error is not None:
        warnings.warn(f"tar shard {path!r} is unreadable past {len(members)} members ({error}): its "
                      "remaining samples are skipped", stacklevel=2)
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    for m in members:
        key, ext = split_member_name(m.name)
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        groups[-1][1][ext] = m
    by_name: dict[str, tarfile.TarInfo] = {}
    for m in members:
        by_name.setdefault(m.name, m)
        by_name.setdefault(os.path.basename(m.name), m)
    shard = TarShard(path, groups, by_name, error, tf)
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

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.file))


def _open_tar(path: str) -> tarfile.TarFile:
    return tarfile.open(path, "r:*")


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
    warning, like a shard unreadable from its start."""
    name = os.path.basename(path.split("?", 1)[0].rstrip(" -") if is_remote(path) else path)
    low = path.lower()
    if is_remote(path) or is_tar(path):
        if is_remote(path):
            fetcher = fetcher or default_fetcher()
            try:
                shard = _fetched(fetcher, path, open_shard)
            except FetchError as e:
                warnings.warn(f"remote shard could not be fetched ({e}): its samples are skipped", stacklevel=2)
                return
            shard.refetch = functools.partial(_fetched, fetcher, path, _open_tar)
        else:
            shard = open_shard(path)
        for key, members in shard.groups:
            if tar_needs is None or tar_needs in members:
                yield RawRecord(f"{name}:{key}", path, members, shard)
    elif low.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if line.strip():
                    yield RawRecord(f"{name}:{i}", path, line)
    elif low.endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            try:
                for i, row in enumerate(csv.DictReader(f)):
                    yield RawRecord(f"{name}:{i}", path, row)
            except csv.Error as e:
                warnings.warn(f"CSV file {path!r} is malformed ({e}): its remaining rows are skipped", stacklevel=2)
    elif low.endswith(".json"):
        with open(path, encoding="utf-8") as f:
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


def parse_json_record(text: Any, where: str) -> dict[str, Any]:
    """A JSONL line / .json member -> dict, or SkipSample('bad_json')."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
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
    # A stable identity (path, or shard:member) under which options.cache_media_mb keeps it; None: never cached.
    cache_key: Optional[str] = None

    def load(self, fps: float = 1.0, max_frames: int = 8) -> list[Image.Image]:
        """-> RGB frames (one for an image); SkipSample('missing_file' | 'bad_image' | 'bad_video') on failure."""
        data = self.read()
        if self.video:
            try:
                return decode_video(data, fps=fps, max_frames=max_frames)
            except ValueError as e:
                raise SkipSample("bad_video", f"{self.name}: {e}") from e
        return decode_frames(data, self.name, fps, max_frames)


def decode_frames(data: bytes, name: str, fps: float = 1.0, max_frames: int = 8) -> list[Image.Image]:
    """An image file's bytes -> its frames: one for a still, an animation's as a video's (`image_frames`)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return image_frames(im, fps, max_frames)
    except Exception as e:  # PIL raises several types for corrupt bytes
        raise SkipSample("bad_image", f"{name}: {type(e).__name__}: {e}") from e


def file_ref(path: str, video: bool = False) -> MediaRef:
    def read() -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise SkipSample("missing_file", f"{path}: {e}") from e

    return MediaRef(path, read, video, cache_key=os.path.abspath(path))


def member_ref(shard: TarShard, member: tarfile.TarInfo, video: bool = False) -> MediaRef:
    name = f"{shard.path}:{member.name}"
    return MediaRef(name, lambda: shard.read(member), video, cache_key=f"{os.path.abspath(shard.path)}:{member.name}")


def bytes_ref(data: bytes, name: str, video: bool = False) -> MediaRef:
    return MediaRef(name, lambda: data, video)


def resolve_relative(base_dir: str, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(base_dir, rel)
