"""Reading a tar shard's member headers to its end, and telling a damaged one: shared by the reader
(`sources.open_shard`) and the remote fetcher, which keeps no damaged download as the cached shard."""

from __future__ import annotations

import tarfile
from typing import Optional


def read_members(tf: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], Optional[str]]:
    """The file members of `tf`, and why it does not end as a tar ends (None when it does). tarfile takes a missing,
    cut or corrupt header after the first member for the end of the archive, so a shard cut at or inside a header
    (an interrupted `pack` or copy, a shard still being written) would read as whole: the end-of-archive block (a
    zero block) must be where the headers stop."""
    members: list[tarfile.TarInfo] = []
    try:
        for m in tf:
            if m.isfile():
                members.append(m)
    except (tarfile.TarError, OSError, EOFError) as e:
        return members, f"{type(e).__name__}: {e}"
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return members, None
    found = ("the file ends" if not block else "a cut header" if len(block) < tarfile.BLOCKSIZE
             else "an unreadable header")
    return members, f"{found} at byte {tf.offset}, where a member or the end-of-archive block should be"


def tar_check(path: str) -> tuple[int, Optional[str]]:
    """(file members read, why the (uncompressed) file at `path` is not a whole tar or None): 0 members and a reason
    for a file that is no tar at all (an HTML page a proxy sent instead), some and a reason for a cut one
    (`read_members`)."""
    try:
        with tarfile.open(path, "r:") as tf:
            members, damage = read_members(tf)
            return len(members), damage
    except (tarfile.TarError, OSError, EOFError) as e:
        return 0, f"{type(e).__name__}: {e}"
