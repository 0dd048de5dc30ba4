"""The demo's stage folders in `--out`: which ones it may delete, and when a finished stage is reused.

A stage folder (`world/`, `backbones/`, `flamingo/`, an ablation's, `eval/`) is created with a `.demo-stage` file in
it before the stage writes anything, and a finished stage writes its result last, into a `.done-<key>.json` marker.
The demo deletes a folder only when it is empty or holds one of those files: anything else under a stage's name in
`--out` is the user's, and the run is refused (`check_out`, before any stage runs) instead of deleting it.

A marker is reused only when every file name its result records is absolute, lies inside the folder, and still
exists: a folder copied or moved elsewhere, or written by a run given a relative `--out` from another working
directory, would otherwise hand the next stage the original's files (or missing ones, failing a stage later).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Collection, Iterator, Optional, Sequence

STAGE_FILE = ".demo-stage"  # written first into every folder the demo creates
DONE_PREFIX = ".done-"


def marker_path(directory: str, key: dict[str, Any]) -> str:
    """The file a finished stage made with `key` (size, seed, ...) writes its result to."""
    return os.path.join(directory, DONE_PREFIX + "-".join(f"{k}={v}" for k, v in sorted(key.items())) + ".json")


def written_by_demo(directory: str, names: Collection[str] = ()) -> bool:
    """Whether the demo may delete (or write into) `directory`: it is missing or empty, or it holds the demo's
    `.demo-stage` file or a stage marker (`.done-*`: demo versions before `.demo-stage` wrote only that). `names`:
    entries the demo writes there, for a folder that older versions left without either file (the `eval/` folder);
    a folder holding only such entries counts as the demo's. A symlink or a file is never the demo's."""
    if not os.path.lexists(directory):
        return True
    if os.path.islink(directory) or not os.path.isdir(directory):
        return False
    entries = os.listdir(directory)
    if STAGE_FILE in entries or any(e.startswith(DONE_PREFIX) for e in entries):
        return True
    return all(e in names for e in entries)


def not_written_by_demo(out: str, folders: Sequence[str]) -> str:
    listed = ", ".join(f"{f}/" for f in folders)
    return (f"{out} already holds {listed}, not written by the demo (no {STAGE_FILE} or {DONE_PREFIX}* file "
            "inside), which its stages would replace: choose another --out, or move them away")


def check_out(out: str, folders: dict[str, Collection[str]]) -> None:
    """Refuse, before any stage runs, an `out` that is not a directory or whose stage `folders` (name -> the entries
    `written_by_demo` accepts in it) the demo did not write."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a directory")
    foreign = [name for name, names in folders.items() if not written_by_demo(os.path.join(out, name), names)]
    if foreign:
        raise ValueError(not_written_by_demo(out, foreign))


def claim(directory: str, names: Collection[str] = (), *, fresh: bool = True) -> None:
    """Make `directory` the demo's: with `fresh`, delete what an earlier run left in it and create it anew, else keep
    its contents; either way, with its `.demo-stage` file, so that a rerun after an interrupt may delete it. A folder
    the demo did not write (`written_by_demo`) raises ValueError and is left alone."""
    if not written_by_demo(directory, names):
        parent, name = os.path.split(os.path.normpath(directory))
        raise ValueError(not_written_by_demo(parent, [name]))
    if fresh and os.path.lexists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, STAGE_FILE), "w") as f:
        f.write("written by flamingo demo: a rerun may delete this folder and rebuild it\n")


def _file_names(value: Any) -> Iterator[str]:
    """The file names a stage result records: its strings with a path separator (the demo's results otherwise hold
    numbers and single words: kinds, colours, the size)."""
    if isinstance(value, str):
        if "/" in value or os.sep in value:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _file_names(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _file_names(v)


def stale_reason(result: Any, directory: str) -> Optional[str]:
    """Why a stage result recorded in `directory`'s marker cannot be reused (None: it can): a recorded file name that
    is relative, lies outside `directory` (compared with symlinks resolved), or is missing."""
    root = os.path.realpath(directory)
    for name in _file_names(result):
        if not os.path.isabs(name):
            return f"it records {name!r}, relative to the working directory of an earlier run"
        if os.path.commonpath([root, os.path.realpath(name)]) != root:
            return f"it records {name}, outside {directory} (a copied or moved demo folder)"
        if not os.path.exists(name):
            return f"{name} is missing"
    return None


def reuse_or_build(directory: str, key: dict[str, Any], build: Callable[[], Any],
                   reused: Optional[list[str]] = None) -> Any:
    """A stage's result, rebuilt unless `directory` holds one made with the same `key` (size, seed) whose files are
    there (`stale_reason`); a reused directory's name is appended to `reused`.

    Before `build`, the folder is claimed (`claim`: emptied and marked as the demo's, or refused when the demo did not
    write it). The result (JSON) is written last, into the marker file, so an interrupted stage is redone, never
    half-reused."""
    name = os.path.basename(os.path.normpath(directory))
    marker = marker_path(directory, key)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                result = json.load(f)
            why = stale_reason(result, directory)
        except ValueError:  # a marker cut short (a full disk): the stage is redone
            why = f"its marker {marker} is not valid JSON"
        if why is None:
            if reused is not None:
                reused.append(name)
            return result
        print(f"[demo] {name}: not reused, {why}; rebuilding it", flush=True)
    claim(directory)
    result = build()
    with open(marker, "w") as f:
        json.dump(result, f)
    return result
