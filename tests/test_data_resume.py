"""Exact resume: after load_state_dict a source yields exactly the batches that would have come next."""

import json
import warnings

import pytest
import torch

from flamingo.data import build_source
from flamingo.data.fixtures import make_interleaved, make_pairs, tiny_processor
from flamingo.train.config import DatasetSection


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


class Stepper:
    """Pulls batches the way the trainer does: re-`iter()` after StopIteration (= next epoch)."""

    def __init__(self, source):
        self.source, self.it = source, None

    def next(self):
        if self.it is None:
            self.it = iter(self.source)
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.source)
            return next(self.it)


def _same(a, b):
    assert a["keys"] == b["keys"]
    for key in ("input_ids", "attention_mask", "labels", "images", "num_media", "num_frames"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_next_batches(tmp_path, processor, num_workers):
    data = make_pairs(str(tmp_path), 11)  # 11 good + 4 bad lines: skips inside the consumed part
    section = DatasetSection("p", "pairs", data["path"], 2, options={"shuffle_buffer": 5})
    warnings.simplefilter("ignore")
    reference = Stepper(build_source(section, processor, seed=7, num_workers=num_workers))
    total = 9  # more than one epoch (per epoch: 5 batches with 0 workers, 4 with 2)
    expected = [reference.next() for _ in range(total)]
    for cut in (1, 3, 6) if num_workers else (2, 5):
        first = Stepper(build_source(section, processor, seed=7, num_workers=num_workers))
        for k in range(cut):
            _same(first.next(), expected[k])
        state = json.loads(json.dumps(first.source.state_dict()))  # checkpoints store it as plain data
        resumed = Stepper(build_source(section, processor, seed=7, num_workers=num_workers))
        resumed.source.load_state_dict(state)
        for k in range(cut, total):
            _same(resumed.next(), expected[k])
        assert resumed.source.skipped == reference.source.skipped


def test_resume_interleaved_with_two_workers_mid_epoch(tmp_path, processor):
    data = make_interleaved(str(tmp_path), 9, images_per_doc=3, sentences=6)
    section = DatasetSection("i", "interleaved", data["path"], 2, options={"image_dir": data["image_dir"],
                                                                           "shuffle_buffer": 4})
    warnings.simplefilter("ignore")
    reference = list(build_source(section, processor, seed=1, num_workers=2))
    source = build_source(section, processor, seed=1, num_workers=2)
    it = iter(source)
    _same(next(it), reference[0])
    state = source.state_dict()
    assert state["epoch"] == 0 and sum(s["batches"] for s in state["streams"]) == 1
    fresh = build_source(section, processor, seed=1, num_workers=2)
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert len(rest) == len(reference) - 1
    for a, b in zip(rest, reference[1:]):
        _same(a, b)
    assert fresh.epoch == 1


def test_changed_worker_count_restarts_the_epoch_with_a_warning(tmp_path, processor):
    data = make_pairs(str(tmp_path), 8, bad=False)
    section = DatasetSection("p", "pairs", data["path"], 2)
    source = build_source(section, processor, num_workers=0)
    next(iter(source))
    other = build_source(section, processor, num_workers=2)
    with pytest.warns(UserWarning, match="not an exact resume"):
        other.load_state_dict(source.state_dict())
    assert other.epoch == 0 and other.batches_this_epoch == 0
