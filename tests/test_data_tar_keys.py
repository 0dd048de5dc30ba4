"""A key repeated in a tar shard: its first sample is read, each later group under it is skipped and counted as
`duplicate_key` (never merged with the first, never lost uncounted), for pairs and interleaved documents, and a
resumed epoch over such a shard yields exactly the batches that would have come next."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from flamingo.data import build_source
from flamingo.data.errors import SkipSample
from flamingo.data.fixtures import image_bytes, mmc4_document, tiny_processor, write_tar
from flamingo.data.inspect import inspect_dataset
from flamingo.data.sources import close_open_shards, open_shard, read_records
from flamingo.data.spec import DatasetSpec
from flamingo.train.config import DatasetSection


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _outcomes(spec: DatasetSpec, path: str) -> list[tuple[str, object]]:
    """(record key, (caption text, media bytes) or the skip reason) of each raw record of `path`, in file order."""
    out: list[tuple[str, object]] = []
    for record in read_records(path, spec.tar_needs):
        try:
            record.check()
            example = spec.example(record)
            out.append((record.key, (example.text, [m.read() for m in example.media])))
        except SkipSample as e:
            out.append((record.key, e.reason))
    close_open_shards()
    return out


def _pair(i: int, caption: str) -> list[tuple[str, bytes]]:
    return [(f"{caption[0]}.png", image_bytes(i)), (f"{caption[0]}.txt", caption.encode())]


@pytest.mark.parametrize("layout", ["adjacent", "apart", "caption_missing"])
def test_a_repeated_pair_key_keeps_its_first_sample_and_counts_the_later_one(tmp_path, processor, layout):
    """`a.png a.txt a.png a.txt` appended nothing (both samples dropped); now the first is read and the second counts
    as one `duplicate_key`, as when the key comes again further on or a later image comes without its caption."""
    first = _pair(1, "a first")
    later = {
        "adjacent": _pair(2, "a second"),
        "apart": _pair(2, "a second"),
        "caption_missing": [("a.png", image_bytes(2))],
    }[layout]
    members = [*first, *later, *_pair(3, "b bee")] if layout != "apart" else [*first, *_pair(3, "b bee"), *later]
    path = write_tar(str(tmp_path / "dup.tar"), members)
    spec = DatasetSpec.create("p", "pairs", path, 1, {}, None)
    with pytest.warns(UserWarning, match="duplicate_key"):
        outcomes = _outcomes(spec, path)
    by_key = {key: outcome for key, outcome in outcomes if outcome != "duplicate_key"}
    assert sorted(by_key) == ["dup.tar:a", "dup.tar:b"]
    text, media = by_key["dup.tar:a"]
    assert "a first" in text and "second" not in text and media == [image_bytes(1)]  # the first sample, whole
    assert [outcome for _, outcome in outcomes].count("duplicate_key") == 1

    section = DatasetSection("p", "pairs", path, 1, options={"shuffle": False})
    source = build_source(section, processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = sorted(k for batch in source for k in batch["keys"])
    assert keys == ["dup.tar:a", "dup.tar:b"] and source.skipped == {"duplicate_key": 1}
    close_open_shards()
    with pytest.warns(UserWarning, match="duplicate_key"):
        report = inspect_dataset(path, "pairs")
    assert report.samples == 2 and report.skipped == {"duplicate_key": 1}


def test_the_shard_index_keeps_each_keys_first_group_and_marks_the_later_ones(tmp_path):
    members = [("a.png", b"1"), ("a.txt", b"x"), ("a.png", b"2"), ("b.png", b"3"), ("a.txt", b"y")]
    shard = open_shard(write_tar(str(tmp_path / "t.tar"), members))
    assert [(key, sorted(group)) for key, group in shard.groups] == [
        ("a", ["png", "txt"]),
        ("a", ["png"]),
        ("b", ["png"]),
        ("a", ["txt"]),
    ]
    assert sorted(shard.repeated) == [1, 3]
    assert shard.read(shard.find("a.png")) == b"1" and shard.read(shard.find("a.txt")) == b"x"  # the first's
    with pytest.warns(UserWarning, match=r"holds 2 sample\(s\) under a key an earlier sample has"):
        lost = [r.lost for r in read_records(shard.path)]
    assert [why and why[0] for why in lost] == [None, "duplicate_key", None, "duplicate_key"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # documents: no group under `a` after the first holds one, nothing to count
        assert list(read_records(shard.path, "json")) == []
    close_open_shards()


@pytest.mark.parametrize("apart", [False, True])
def test_a_repeated_document_key_keeps_the_first_document_with_its_own_image(tmp_path, apart):
    """Each `d.json` names `d.0.png`: the first document reads the first `d.0.png` (it was `missing_file`, both
    members sharing the name), the later one counts as `duplicate_key`, and `e` between them keeps its own."""
    doc = json.dumps(mmc4_document(2, {0: 1}, image_names=["d.0.png"])).encode()
    first = [("d.json", doc), ("d.0.png", image_bytes(1))]
    other = [("e.json", doc.replace(b"d.0", b"e.0")), ("e.0.png", image_bytes(2))]
    later = [("d.json", doc), ("d.0.png", image_bytes(3))]
    members = [*first, *other, *later] if apart else [*first, *later, *other]
    path = write_tar(str(tmp_path / "docs.tar"), members)
    spec = DatasetSpec.create("d", "interleaved", path, 1, {}, None)
    with pytest.warns(UserWarning, match="duplicate_key"):
        outcomes = [
            (key, outcome if isinstance(outcome, str) else outcome[1]) for key, outcome in _outcomes(spec, path)
        ]
    d, e = ("docs.tar:d", [image_bytes(1)]), ("docs.tar:e", [image_bytes(2)])
    assert outcomes == ([d, e, ("docs.tar:d", "duplicate_key")] if apart else [d, ("docs.tar:d", "duplicate_key"), e])


def _same(a, b):
    assert a["keys"] == b["keys"]
    for key in ("input_ids", "attention_mask", "labels", "images"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_over_a_shard_with_repeated_keys_yields_exactly_the_next_batches(tmp_path, processor, num_workers):
    members = []
    for i in range(8):
        members += _pair(i, f"{'abcdefgh'[i]} caption {i}")
        if i % 3 == 0:  # a sample appended again, in a row and further on
            members += _pair(100 + i, f"{'abcdefgh'[i]} again {i}")
    members += _pair(200, "e later")  # further on, in the second shard
    write_tar(str(tmp_path / "s-0.tar"), members[: len(members) // 2])
    write_tar(str(tmp_path / "s-1.tar"), members[len(members) // 2 :])
    section = DatasetSection("p", "pairs", str(tmp_path / "s-{0..1}.tar"), 2, options={"shuffle_buffer": 3})
    warnings.simplefilter("ignore")
    reference = list(build_source(section, processor, seed=3, num_workers=num_workers))
    source = build_source(section, processor, seed=3, num_workers=num_workers)
    it = iter(source)
    _same(next(it), reference[0])
    state = json.loads(json.dumps(source.state_dict()))
    resumed = build_source(section, processor, seed=3, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 1
    for a, b in zip(rest, reference[1:]):
        _same(a, b)
    assert resumed.skipped == {"duplicate_key": 4}
    assert sum(len(batch["keys"]) for batch in reference) == 8
