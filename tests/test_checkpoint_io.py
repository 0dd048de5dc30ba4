"""Atomic directory writes (runtime/checkpoint_io.py): two writes to one target, and a swap that fails midway."""

import os
import threading

import pytest

import flamingo.runtime.checkpoint_io as checkpoint_io
from flamingo.runtime.checkpoint_io import atomic_directory, unfinished_write


def _write(target, name, entered=None, proceed=None):
    with atomic_directory(target, "state.json", "a training checkpoint") as tmp:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            f.write(name)
        if entered is not None:
            entered.set()
            proceed.wait(10)
        with open(os.path.join(tmp, name), "w") as f:
            f.write(name)


def test_two_threads_writing_one_target_keep_their_copies_apart(tmp_path):
    """Both threads fill their own temporary copy: the target ends as one whole write, never a mix or a loss."""
    target = str(tmp_path / "ckpt")
    entered, proceed = threading.Event(), threading.Event()
    first = threading.Thread(target=_write, args=(target, "a", entered, proceed))
    first.start()
    assert entered.wait(10)
    _write(target, "b")  # a second write starts and ends while the first is still filling its copy
    proceed.set()
    first.join(10)
    assert sorted(os.listdir(target)) == ["a", "state.json"]  # the last to finish, whole
    assert open(os.path.join(target, "state.json")).read() == "a"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_a_write_that_loses_the_swap_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """Another write landing between the two renames (target -> .old, copy -> target): a clear error, the other
    write's copy kept, no `.tmp-`/`.old-` sibling left."""
    target = str(tmp_path / "ckpt")
    _write(target, "first")
    real_replace = os.replace

    def racing_replace(src, dst):
        real_replace(src, dst)
        if unfinished_write(os.path.basename(dst)) == ("ckpt", "old"):  # the other write lands now
            os.makedirs(target)
            with open(os.path.join(target, "state.json"), "w") as f:
                f.write("other")

    monkeypatch.setattr(checkpoint_io.os, "replace", racing_replace)
    with pytest.raises(ValueError, match="could not be swapped in .*another write"):
        _write(target, "second")
    assert os.listdir(tmp_path) == ["ckpt"]
    assert open(os.path.join(target, "state.json")).read() == "other"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_swap_puts_the_previous_copy_back(tmp_path, monkeypatch, error):
    """A rename that fails, or a Ctrl-C between the two renames (which left no target, the new copy under `.tmp-`),
    puts the previous copy back and leaves nothing of the write."""
    target = str(tmp_path / "ckpt")
    _write(target, "first")
    real_replace = os.replace

    def failing_replace(src, dst):
        if unfinished_write(os.path.basename(src)) == ("ckpt", "tmp"):
            raise error
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "replace", failing_replace)
    with pytest.raises(ValueError if isinstance(error, OSError) else KeyboardInterrupt, match="No space left"
                       if isinstance(error, OSError) else None):
        _write(target, "second")
    assert sorted(os.listdir(target)) == ["first", "state.json"]
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("name,expected", [("step_00000002.tmp-123", ("step_00000002", "tmp")),
                                           ("model.old-12-140234", ("model", "old")),
                                           ("model.tmp-x", None), ("model", None)])
def test_unfinished_write_names(name, expected):
    assert unfinished_write(name) == expected


def test_saved_weights_get_the_mode_of_every_other_file_of_the_save(tmp_path):
    """safetensors 0.8 writes its files 0600 whatever the umask: a model saved by one account could not be read by
    another (a server's), unlike its config. Under umask 022 every file of a save is 0644."""
    from flamingo.tiny import tiny_flamingo

    model, processor = tiny_flamingo()
    previous = os.umask(0o022)
    try:
        model.save_pretrained(str(tmp_path / "saved"), processor=processor)
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in (tmp_path / "saved").rglob("*") if p.is_file()}
    assert "saved/flamingo.safetensors" in modes and "saved/lm/model.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes


def test_every_file_of_a_write_is_on_the_disk_before_it_is_renamed_in(tmp_path, monkeypatch):
    """A rename can reach the disk before the files' data (a power loss, a node's crash): every file, and the
    directories, are flushed first, then the parent holding the renames."""
    synced: list[str] = []
    renamed: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        renamed.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_io.os, "replace", replace)
    target = tmp_path / "ckpt"
    with atomic_directory(str(target), "state.json", "a checkpoint") as tmp:
        os.makedirs(os.path.join(tmp, "lm"))
        for name in ("state.json", "lm/weights.bin"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("x")
    files = [os.path.join(tmp, "state.json"), os.path.join(tmp, "lm", "weights.bin")]
    assert set(files + [tmp, os.path.join(tmp, "lm")]) <= set(synced[:-1]) and renamed == [tmp]
    assert synced[-1] == str(tmp_path)  # the rename, after it
    with checkpoint_io.atomic_file(str(tmp_path / "out.jsonl")) as path:
        with open(path, "w") as f:
            f.write("{}\n")
    assert synced[-2:] == [path, str(tmp_path)]


_FULL_DISK = """
import errno, resource, signal, sys, torch
from safetensors.torch import save_file
from flamingo.runtime.checkpoint_io import atomic_directory
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as ENOSPC on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    with atomic_directory(sys.argv[1], "state.json", "a training checkpoint") as tmp:
        save_file({"w": torch.zeros(1 << 16)}, tmp + "/trained.safetensors")
except OSError as e:
    print(e.errno == errno.EFBIG, e)
"""


def test_a_full_disk_under_safetensors_is_an_oserror_naming_the_write(tmp_path):
    """safetensors raises its own error for a failed write (neither OSError nor naming the file): the CLI printed a
    traceback where it prints one line for any OSError."""
    import subprocess
    import sys

    target = tmp_path / "ckpt"
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(target)], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("True ") and f"a training checkpoint {str(target)!r} was not written" in out.stdout, \
        out.stderr[-2000:]
    assert "File too large" in out.stdout and os.listdir(tmp_path) == []


def test_a_write_to_a_link_goes_where_it_points_and_keeps_it(tmp_path):
    """A cluster's `ckpt -> /scratch/ckpt`: the write lands in the linked directory, on its disk, the link kept
    (the link itself was moved aside and a directory made beside it, on the link's disk; the second write then
    failed on the moved link)."""
    (tmp_path / "scratch" / "ckpt").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    link = tmp_path / "home" / "ckpt"
    link.symlink_to(tmp_path / "scratch" / "ckpt")
    for step in range(2):
        with atomic_directory(str(link), "state.json", "a checkpoint") as tmp:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                f.write(str(step))
        assert link.is_symlink() and (tmp_path / "scratch" / "ckpt" / "state.json").read_text() == str(step)
    assert os.listdir(tmp_path / "home") == ["ckpt"] and os.listdir(tmp_path / "scratch") == ["ckpt"]


def test_copies_a_killed_write_left_are_named_and_removed_by_the_next_write(tmp_path):
    """A write killed between its two renames leaves no target, the previous copy under `.old-` and the new one
    under `.tmp-` (a whole model each): loading says so, and the next write to the target removes the copies of
    writers that no longer run (a live one's stay)."""
    from flamingo.runtime.hub import local_or_hub

    target = tmp_path / "final"
    dead, thread = 2**22 + 7, 140000000000001  # past any pid_max: no such process; a thread id as Linux gives them
    backups = ["final.old-2024-06", "final.old-20240607"]  # a user's names: no write of this module's
    for name in (f"final.old-{dead}-{thread}", f"final.tmp-{dead}-{thread}", f"final.tmp-{os.getppid()}-{thread}",
                 *backups):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"a save killed while it replaced it left .*final.old-{dead}-"
                                                r".*rename one to 'final'"):
        local_or_hub(str(target), "Flamingo model")
    with atomic_directory(str(target), "state.json", "a checkpoint") as tmp:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            f.write("{}")
    assert sorted(os.listdir(tmp_path)) == sorted(["final", f"final.tmp-{os.getppid()}-{thread}", *backups])
    # through a link: a save writes beside the directory it names, where loading looks too
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / f"ckpt.old-{dead}-{thread}").mkdir()
    (tmp_path / "ckpt").symlink_to(tmp_path / "scratch" / "ckpt")  # its target renamed away by the killed save
    with pytest.raises(FileNotFoundError, match=rf"left ckpt.old-{dead}-{thread} beside it"):
        local_or_hub(str(tmp_path / "ckpt"), "Flamingo model")


def test_a_name_too_long_for_the_write_s_siblings_is_refused_with_the_limit(tmp_path):
    """A legal name near the file system's 255 bytes, too long once the write's `.tmp-PID-THREAD` suffix is added:
    a ValueError giving the room left, before anything is written (it was `[Errno 36] File name too long` naming the
    temporary copy); a name that fits is written."""
    from flamingo.runtime.checkpoint_io import atomic_file

    long = tmp_path / ("m" * 240)
    with pytest.raises(ValueError, match=r"too long to be written atomically here \(at most \d+ bytes"):
        with atomic_directory(str(long), "state.json", "a checkpoint"):
            pass
    with pytest.raises(ValueError, match="too long"):
        with atomic_file(str(long)):
            pass
    assert os.listdir(tmp_path) == []
    fits = tmp_path / ("m" * 200)
    with atomic_directory(str(fits), "state.json", "a checkpoint") as tmp:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            f.write("{}")
    assert os.listdir(fits) == ["state.json"]
