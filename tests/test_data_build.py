"""`DatasetSource` reports: a data error from a DataLoader worker reaches the caller as the same one-line ValueError
(of the same class) as without workers, and each data warning (an epoch's skips) is said once, as a warning, not also
as a log record."""

import json
import logging
import os

import pytest

from flamingo.data import build_source
from flamingo.data.build import WorkerTraceback
from flamingo.data.fixtures import make_pairs, tiny_processor
from flamingo.train.config import DatasetSection
from flamingo.video import TooLong, TooManyPixels


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_data_error_in_a_worker_is_raised_with_its_own_message(tmp_path, processor, num_workers):
    path = os.path.join(tmp_path, "missing.jsonl")
    with open(path, "w") as f:  # every image missing: each stream stops at its 10th sample (max_bad_fraction)
        f.writelines(json.dumps({"image": f"nope{i}.png", "caption": "a photo"}) + "\n" for i in range(24))
    source = build_source(DatasetSection("p", "pairs", path, 2), processor, num_workers=num_workers)
    with pytest.raises(ValueError) as raised:
        next(iter(source))
    message = str(raised.value)
    assert message.startswith(f"10 of 10 samples read from {path!r} were bad {{'missing_file': 10}}"), message
    assert "Traceback" not in message and "\n" not in message
    if num_workers:  # the worker's traceback is kept as the cause, for a reader of the full traceback
        assert isinstance(raised.value.__cause__, WorkerTraceback)
        assert "Traceback" in str(raised.value.__cause__)


def test_an_epochs_skips_are_reported_once(tmp_path, processor, caplog, recwarn):
    data = make_pairs(str(tmp_path), 6)  # 6 good + 4 bad lines
    source = build_source(DatasetSection("p", "pairs", data["path"], 2), processor)
    with caplog.at_level(logging.INFO, logger="flamingo.data"):
        assert len(list(source)) == 3
    reports = [str(w.message) for w in recwarn if "epoch 0: skipped 4 bad sample(s)" in str(w.message)]
    assert len(reports) == 1 and "dataset 'p' (rank 0)" in reports[0]
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]


def _raising(error: ValueError):
    """A stream (`DatasetSource._stream`) that raises `error` at its first item."""

    def stream(s, epoch, start):
        raise error
        yield  # a generator: it raises when first read, as a stream reading bad data does

    return stream


def _raised(source, error: ValueError) -> ValueError:
    source._stream = _raising(error)  # the forked worker inherits it
    with pytest.raises(ValueError) as raised:
        next(iter(source))
    return raised.value


@pytest.mark.parametrize("error", [TooLong("a 12.0 s clip, past max_seconds=5.0"), TooManyPixels(300, 200, 2, 10_000)],
                         ids=["TooLong", "TooManyPixels"])
def test_a_workers_error_keeps_its_class_and_message(tmp_path, processor, error):
    """A caller's `except TooLong` catches a worker's as it catches the in-process one."""
    data = make_pairs(str(tmp_path), 4)
    section = DatasetSection("p", "pairs", data["path"], 2)
    alone = _raised(build_source(section, processor, num_workers=0), error)
    worker = _raised(build_source(section, processor, num_workers=1), error)
    assert type(worker) is type(alone) is type(error)
    assert str(worker) == str(alone) == str(error)
    assert isinstance(worker.__cause__, WorkerTraceback)
    if isinstance(error, TooManyPixels):  # its fields come along (the server names the frame from them)
        assert (worker.width, worker.height, worker.frame, worker.max_pixels) == (300, 200, 2, 10_000)


def test_a_workers_error_of_a_class_that_cannot_cross_is_a_value_error(tmp_path, processor):
    class Local(ValueError):  # defined in a function: no pickle finds it by name
        pass

    data = make_pairs(str(tmp_path), 4)
    worker = _raised(build_source(DatasetSection("p", "pairs", data["path"], 2), processor, num_workers=1),
                     Local("a local error"))
    assert type(worker) is ValueError and str(worker) == "a local error"


def _dying(s, epoch, start):
    """A stream whose worker dies at its first item (a decoder's segfault, the OOM killer)."""
    os._exit(137)
    yield


def test_a_dead_worker_is_named_with_its_dataset(tmp_path, processor):
    """torch's own error names no dataset (`DataLoader worker (pid N) exited unexpectedly`), or comes as a socket's
    ConnectionResetError, which reads as a network error: the dataset and the way on are named."""
    data = make_pairs(str(tmp_path), 4)
    source = build_source(DatasetSection("photos", "pairs", data["path"], 2), processor, num_workers=1)
    source._stream = _dying
    with pytest.raises(RuntimeError, match=r"dataset 'photos' \(rank 0\): a DataLoader worker died .*resumes from "
                                           "its last checkpoint"):
        next(iter(source))
    # a live worker's own error (not a ValueError: torch re-raises it as its type, "Caught ... in DataLoader worker")
    # is no death
    source = build_source(DatasetSection("photos", "pairs", data["path"], 2), processor, num_workers=1)
    source._stream = _raising(RuntimeError("cannot decompress tar shard 'x.tar.gz': free space there"))
    with pytest.raises(RuntimeError, match="cannot decompress") as raised:
        next(iter(source))
    assert "a DataLoader worker died" not in str(raised.value)


def test_a_mostly_bad_file_aborts_whatever_the_order_of_its_bad_rows(tmp_path, processor):
    """max_bad_fraction was checked only when a sample was skipped: a file whose bad rows all came before its
    min_samples-th read (9 of 12 bad, bad first) loaded without a word; the same rows good first aborted."""
    data = make_pairs(str(tmp_path), 3, bad=False)
    good = [line for line in open(data["path"]) if line.strip()]
    bad = [json.dumps({"image": f"nope{i}.png", "caption": "a photo"}) + "\n" for i in range(9)]
    for order, name in ((bad + good, "bad_first.jsonl"), (good + bad, "good_first.jsonl")):
        path = os.path.join(tmp_path, name)
        with open(path, "w") as f:
            f.writelines(order)
        source = build_source(DatasetSection("p", "pairs", path, 1, options={"shuffle": False}), processor)
        with pytest.raises(ValueError, match=r"[79] of 1[0-2] samples read from .* were bad"):
            list(source)
