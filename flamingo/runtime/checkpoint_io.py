"""Atomic writes: a checkpoint directory or file is either the old one or the complete new one, never half."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

from safetensors import SafetensorError

# the siblings a write leaves while it runs: `<target>.tmp-<pid>[-<thread>]` (being filled), `<target>.old-<pid>[...]`
# (being replaced); the thread id keeps two threads' writes to one target apart
_UNFINISHED_RE = re.compile(r"^(.+)\.(tmp|old)-\d+(?:-\d+)?$")


def unfinished_write(name: str) -> Optional[tuple[str, str]]:
    """`name` (a directory entry) -> (the target's name, "tmp" or "old") when it is what an atomic write killed before
    it ended leaves beside its target (a "tmp" is never complete; an "old" is the previous copy), else None."""
    m = _UNFINISHED_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def interrupted_copies(target: str) -> list[str]:
    """The copies an atomic write to `target` killed between its renames or before its end left beside it
    (`target.old-PID-TID`: the previous copy; `target.tmp-PID-TID`: the new one, whole only when the write was
    killed after filling it), sorted."""
    parent, name = os.path.split(os.path.abspath(target))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries if (u := unfinished_write(e)) is not None and u[0] == name)


# the copies this module's writes leave (`_sibling`: a pid, then a thread id, 9 digits or more): a name a user gives a
# backup (`final.old-2024-06`, `final.old-20240607`) is none
_OWN_COPY_RE = re.compile(r"\.(?:tmp|old)-(\d+)-\d{9,}$")


def _remove_dead_writers_copies(target: str) -> None:
    """Remove `interrupted_copies` of `target` that this module's writes leave (`_OWN_COPY_RE`) whose writing process
    no longer runs here (a whole model's copy each); a live process's write stays (it is refused at its swap, or is
    this one's)."""
    for path in interrupted_copies(target):
        own = _OWN_COPY_RE.search(os.path.basename(path))
        if own is None:
            continue
        pid = int(own.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # it runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):  # another user's process, or no pid
            continue
        if os.path.islink(path) or not os.path.isdir(path):
            with contextlib.suppress(OSError):
                os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _sibling(target: str, kind: str) -> str:
    return f"{target}.{kind}-{os.getpid()}-{threading.get_ident()}"


def _check_sibling_fits(target: str, what: str) -> None:
    """Refuse a `target` whose name leaves no room for the write's sibling names (`_sibling`'s suffix, ~30 bytes) in
    the file system's limit on one name (255 bytes on most), with the figures, before anything is written."""
    parent = os.path.dirname(os.path.abspath(target))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # (no such directory yet, or a platform without pathconf)
        limit = 255
    name = os.fsencode(os.path.basename(_sibling(os.path.abspath(target), "tmp")))
    if len(name) > limit:
        spare = limit - (len(name) - len(os.fsencode(os.path.basename(os.path.abspath(target)))))
        raise ValueError(f"{what} {target!r}: its name is too long to be written atomically here (at most {spare} "
                         f"bytes: the file system allows {limit} per name, and the write goes through a sibling "
                         "named after it with a suffix); give a shorter name")


def blocking_file(directory: str) -> Optional[str]:
    """The file that keeps `directory` from being a directory, itself or the nearest existing part of its path (an
    absolute path), or None when it is one or can be made (the nearest part that exists is a directory)."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def check_named(target: str, what: str) -> None:
    """Refuse an empty (or blank) path for `what`: it names nothing, and made absolute it is the working directory,
    which a write would replace whole (`--out ""`, an unset variable)."""
    if not os.fspath(target).strip():
        raise ValueError(f"{what}: an empty path ({os.fspath(target)!r}) names nothing (made absolute, it would be "
                         "the working directory, which is never replaced): give a path")


def check_replaceable(target: str, marker: str, what: str, is_ours: Optional[Callable[[str], bool]] = None) -> None:
    """`target` may be replaced whole: it is absent, an empty directory, or an earlier write (`what`: it holds
    `marker`, and `is_ours(target)` holds when given: a marker other programs write too, such as `config.json`,
    needs the content checked). A file, or a directory of other files (the working directory, say), is refused,
    never deleted; so is an empty path (`check_named`)."""
    check_named(target, what)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{target!r} is a file: {what} is a directory")
    if not os.path.isdir(target) or not os.listdir(target):
        return
    if not os.path.isfile(os.path.join(target, marker)):
        why = f"no {marker}"
    elif is_ours is not None and not is_ours(target):
        why = f"its {marker} is another program's"
    else:
        return
    raise ValueError(f"{target!r} holds files and is not {what} ({why}): writing replaces the whole directory, so "
                     "write into a new or empty one")


def foreign_entries(target: str, names: Sequence[str]) -> list[str]:
    """The entries of the directory `target` (none when it is absent) that match none of `names` (shell patterns):
    what replacing it whole with a write of those names would delete."""
    if not os.path.isdir(target):
        return []
    return sorted(e for e in os.listdir(target) if not any(fnmatch.fnmatchcase(e, n) for n in names))


def check_apart(target: str, source: str, what: str, *, inside: bool = True) -> None:
    """Refuse writing `target` (`what`) around `source`, a path it is made from (replacing a directory would delete
    it), and inside it unless `inside` is False (a model directory the write must leave as it was). A `source` that
    is no local path (a Hub name) is not checked."""
    if not os.path.exists(source):
        return
    out, src = os.path.realpath(target), os.path.realpath(source)
    common = os.path.commonpath([out, src])
    if common == out or (inside and common == src):
        where = "over or around" if common == out else "inside"
        raise ValueError(f"{what} {target!r} would be written {where} {source!r}, which it is made from: write it "
                         "elsewhere")


@contextmanager
def atomic_directory(target: str, marker: str, what: str,
                     is_ours: Optional[Callable[[str], bool]] = None) -> Iterator[str]:
    """Yield a temporary sibling directory to fill; on success it replaces `target`, on error it is removed. `marker`,
    `is_ours`: what tells an earlier such write, `what`: what it is (`check_replaceable`, checked first).

    The swap is two renames (target -> `.old-`, the new copy -> target). Where another write to the same target
    lands between them, this one is refused with a ValueError and leaves nothing behind (the other's copy stays);
    where the second rename fails otherwise, the previous copy is put back."""
    check_replaceable(target, marker, what, is_ours)
    # the directory a link names (a cluster's `ckpt -> /scratch/...`): written there, on its disk, the link kept
    target = os.path.realpath(target)
    _check_sibling_fits(target, what)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _sibling(target, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        readable_as_created(tmp)
        sync_tree(tmp)
    except SafetensorError as e:  # safetensors' I/O errors (a full disk) are no OSError, and name no file
        shutil.rmtree(tmp, ignore_errors=True)
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), f"{what} {target!r} was not written ({e}); nothing of this write is "
                                          "left") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _sibling(target, "old")
    moved = False
    try:
        if os.path.exists(target):
            os.replace(target, old)
            moved = True
        os.replace(tmp, target)
    except BaseException as e:  # (a Ctrl-C between the renames too: the previous copy goes back)
        if moved and not os.path.exists(target):
            os.replace(old, target)  # the previous copy back in place
        shutil.rmtree(old, ignore_errors=True)  # (still here only where another write has replaced it)
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        raise ValueError(f"{what} {target!r} was not written: it could not be swapped in ({e}; another write to it "
                         "at the same time?); nothing of this write is left") from e
    _sync_directory(parent)  # the renames
    shutil.rmtree(old, ignore_errors=True)
    _remove_dead_writers_copies(target)  # what earlier writes killed between their renames left


def sync_tree(root: str) -> None:
    """Flush every file under `root`, and the directories, to the disk: renamed into place, a write is then whole
    after a power loss or a node's crash too (a rename alone can land before the files' data, leaving them empty)."""
    for directory, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                _sync_file(os.path.join(directory, name))
        _sync_directory(directory)


def _sync_file(path: str) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # (Windows flushes writable handles only)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(path: str) -> None:
    """Flush a directory's entries (where the platform can: Windows opens no directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (`os.umask` sets it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def readable_as_created(directory: str) -> None:
    """Give the files under `directory` that were written 0600 the mode a new file gets (0666 less the umask):
    safetensors 0.8 writes through a temporary file of mode 0600 whatever the umask (safetensors#782), so weights
    saved by one account could not be read by another (a server's), unlike every other file of the save."""
    if os.name != "posix":
        return
    mode = 0o666 & ~_umask()
    if mode == 0o600:
        return
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o777 == 0o600:
                os.chmod(path, mode)


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success it is renamed onto `path` (an empty one is refused:
    `check_named`)."""
    check_named(path, "the file to write")
    _check_sibling_fits(path, "the file to write")
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        if os.path.isfile(tmp):
            _sync_file(tmp)
        os.replace(tmp, path)
        _sync_directory(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
