"""Atomic writes: a checkpoint directory or file is either the old one or the complete new one, never half."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """Yield a temporary sibling directory to fill; on success it replaces `target`, on error it is removed."""
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
