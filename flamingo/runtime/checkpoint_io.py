"""Atomic writes: a checkpoint directory or file is either the old one or the complete new one, never half."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator


def check_replaceable(target: str, marker: str, what: str) -> None:
    """`target` may be replaced whole: it is absent, an empty directory, or an earlier write (`what`: it holds
    `marker`). A file, or a directory of other files (the working directory, say), is refused, never deleted."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{target!r} is a file: {what} is a directory")
    if os.path.isdir(target) and os.listdir(target) and not os.path.isfile(os.path.join(target, marker)):
        raise ValueError(f"{target!r} holds files and is not {what} (no {marker}): writing replaces the whole "
                         "directory, so write into a new or empty one")


@contextmanager
def atomic_directory(target: str, marker: str, what: str) -> Iterator[str]:
    """Yield a temporary sibling directory to fill; on success it replaces `target`, on error it is removed. `marker`:
    a file every such write holds, `what`: what it is (`check_replaceable`, checked first)."""
    check_replaceable(target, marker, what)
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success it is renamed onto `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
