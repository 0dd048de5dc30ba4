"""Loaders: exactly the good samples, skip counts by reason, sharding across ranks x workers, bad-file abort."""

import csv
import json
import os
import warnings

import pytest
import torch

from flamingo.data import MixtureSampler, WeightedMixture, build_source, build_sources
from flamingo.data.fixtures import (
    make_interleaved,
    make_pair_shards,
    make_pairs,
    make_videos,
    tiny_processor,
    write_jsonl,
)
from flamingo.data.sources import open_shard
from flamingo.train.config import DatasetSection


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _epoch(source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(source)


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


def _check_batch(batch, processor):
    ids = batch["input_ids"]
    assert int((ids == processor.media_token_id).sum()) == int(batch["num_media"].sum())
    for b in range(ids.shape[0]):
        assert int((ids[b] == processor.media_token_id).sum()) == int(batch["num_media"][b])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"][ids == processor.media_token_id] == -100).all()


def test_pairs_jsonl_good_samples_and_skip_counts(tmp_path, processor):
    data = make_pairs(str(tmp_path), 7)
    src = build_source(DatasetSection("p", "pairs", data["path"], 2, options={"drop_last": False}), processor)
    with pytest.warns(UserWarning, match="skipped 4 bad"):
        batches = list(src)
    assert sorted(_keys(batches)) == sorted(data["good"])
    assert src.skipped == data["bad"]
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 2, 1]
    for b in batches:
        _check_batch(b, processor)
        assert b["images"].shape[1:3] == (1, 1)
    first = batches[0]
    ids = first["input_ids"][0][first["attention_mask"][0] == 1].tolist()
    caption = processor.tokenizer.decode(ids)
    assert caption.startswith("<image>photo ") and caption.endswith("<|endofchunk|><|endoftext|>")
    assert first["labels"][0, 0] == -100 and first["labels"][0, 1] == first["input_ids"][0, 1]


def test_pairs_csv_batches_are_exactly_batch_size_with_drop_last(tmp_path, processor):
    make_pairs(str(tmp_path), 5, bad=False)
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        for i in range(5):
            w.writerow({"image": f"images/{i}.png", "caption": f"a photo, number {i}"})
    src = build_source(DatasetSection("p", "pairs", str(path), 2), processor)
    batches = _epoch(src)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2]  # drop_last: exactly batch_size
    assert src.skipped == {}


def test_pairs_tar_shards_skip_bad_images_and_truncate_to_max_tokens(tmp_path, processor):
    data = make_pair_shards(str(tmp_path), 7, 3, bad=True)
    src = build_source(DatasetSection("p", "pairs", data["path"], 1, options={"max_tokens": 4}), processor)
    batches = _epoch(src)
    assert sorted(_keys(batches)) == sorted(f"shard-{i // 3:06d}.tar:s{i:05d}" for i in range(7))
    assert src.skipped == {"bad_image": 1}
    assert max(b["input_ids"].shape[1] for b in batches) == 4


def test_interleaved_jsonl_and_tar_keep_good_documents_with_their_images(tmp_path, processor):
    for tar in (0, 2):
        data = make_interleaved(str(tmp_path / f"t{tar}"), 5, tar_shards=tar)
        options = {"drop_last": False, "image_dir": data.get("image_dir")} if not tar else {"drop_last": False}
        src = build_source(DatasetSection("i", "interleaved", data["path"], 2, options=options), processor)
        batches = _epoch(src)
        assert len(_keys(batches)) == data["n_good"]
        assert src.skipped == data["bad"]
        for b in batches:
            _check_batch(b, processor)
            assert b["num_media"].tolist() == [2] * b["input_ids"].shape[0]


def test_video_pairs_give_one_medium_of_frames_at_fps_capped_at_max_frames(tmp_path, processor):
    data = make_videos(str(tmp_path), 3, seconds=3)
    src = build_source(DatasetSection("v", "video", data["path"], 3, options={"fps": 1.0, "max_frames": 2}),
                       processor)
    (batch,) = _epoch(src)
    assert src.skipped == data["bad"]
    assert batch["images"].shape == (3, 1, 2, 3, 32, 32)  # one medium of 2 frames (3 s at 1 FPS, capped at 2)
    assert batch["num_frames"].tolist() == [[2]] * 3
    _check_batch(batch, processor)


def test_two_ranks_two_workers_disjoint_and_complete(tmp_path, processor):
    data = make_pairs(str(tmp_path), 13)  # one JSONL file: split by line index
    seen = []
    for rank in range(2):
        src = build_source(DatasetSection("p", "pairs", data["path"], 2, options={"drop_last": False}), processor,
                           rank=rank, world_size=2, num_workers=2, seed=3)
        keys = _keys(_epoch(src))
        assert len(keys) == len(set(keys)) and keys
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(data["good"])
    # Shards: 4 files over 4 global streams, whole files each.
    shards = make_pair_shards(str(tmp_path / "s"), 8, 2)
    parts = []
    for rank in range(2):
        src = build_source(DatasetSection("s", "pairs", shards["path"], 1), processor, rank=rank, world_size=2,
                           num_workers=2)
        parts.append(set(_keys(_epoch(src))))
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 8


def test_same_seed_gives_same_batches_and_each_epoch_is_reshuffled(tmp_path, processor):
    data = make_pairs(str(tmp_path), 12, bad=False)
    section = DatasetSection("p", "pairs", data["path"], 3, options={"shuffle_buffer": 8})
    a, b = build_source(section, processor, seed=1), build_source(section, processor, seed=1)
    ea, eb = _epoch(a), _epoch(b)
    assert _keys(ea) == _keys(eb) and all(torch.equal(x["images"], y["images"]) for x, y in zip(ea, eb))
    second = _epoch(a)
    assert sorted(_keys(second)) == sorted(_keys(ea)) and _keys(second) != _keys(ea)
    assert a.epoch == 2


def test_mostly_bad_file_raises_naming_it(tmp_path, processor):
    rows = [{"image": "nope.png", "caption": f"x {i}"} for i in range(12)] + ["{bad"] * 3
    path = write_jsonl(str(tmp_path / "bad.jsonl"), rows)
    src = build_source(DatasetSection("p", "pairs", path, 2), processor)
    with pytest.raises(ValueError, match="bad.jsonl"):
        _epoch(src)


def test_dataset_too_small_for_one_batch_raises(tmp_path, processor):
    data = make_pairs(str(tmp_path), 2, bad=False)
    src = build_source(DatasetSection("p", "pairs", data["path"], 4), processor)
    with pytest.raises(ValueError, match="no batch of 4"):
        _epoch(src)


def test_unknown_options_missing_files_and_unknown_kinds_are_errors(tmp_path, processor):
    data = make_pairs(str(tmp_path), 2, bad=False)
    with pytest.raises(ValueError, match="unknown options"):
        build_source(DatasetSection("p", "pairs", data["path"], 1, options={"max_imgs": 3}), processor)
    with pytest.raises(ValueError, match="not found"):
        build_source(DatasetSection("p", "pairs", str(tmp_path / "x-{000..002}.tar"), 1), processor)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        build_source(DatasetSection("p", "audio", data["path"], 1), processor)


@pytest.mark.parametrize("kind, option, value", [("interleaved", "max_images", 0), ("interleaved", "max_images", -1),
                                                 ("video", "fps", 0), ("video", "max_frames", 0),
                                                 ("chat", "fps", -1.0)])
def test_options_below_their_least_value_are_refused_by_name(tmp_path, processor, kind, option, value):
    # max_images 0 / fps 0 skipped every sample as bad data; max_images -1 cut each document's last image unseen;
    # max_frames 0 meant 8
    data = make_pairs(str(tmp_path), 2, bad=False)
    with pytest.raises(ValueError, match=f"{option} must be"):
        build_source(DatasetSection("d", kind, data["path"], 1, options={option: value}), processor)


@pytest.mark.parametrize("kind,option,value,what", [
    ("pairs", "shuffle", "false", "true or false"), ("pairs", "max_tokens", "32", "an integer"),
    ("pairs", "max_tokens", True, "an integer"), ("pairs", "max_bad_fraction", "half", "a number"),
    ("video", "max_frames", 2.5, "an integer or null"), ("pairs", "remote_cache_dir", 7, "a string or null")])
def test_options_of_another_type_than_their_default_are_refused_by_name(tmp_path, processor, kind, option, value,
                                                                         what):
    # a quoted "false" read as true; "32" failed deep inside the loader
    data = make_pairs(str(tmp_path), 2, bad=False)
    with pytest.raises(ValueError, match=f"option {option} must be {what}, got"):
        build_source(DatasetSection("d", kind, data["path"], 1, options={option: value}), processor)
    # integers where a number is asked for, null where the default is null: taken
    build_source(DatasetSection("d", "pairs", data["path"], 1, options={
        "max_bad_fraction": 1, "cache_media_mib": 16, "remote_cache_dir": None}), processor)


def test_weighted_mixture_draws_every_source_and_resumes_exactly(tmp_path, processor):
    pairs = make_pairs(str(tmp_path / "p"), 6, bad=False)
    docs = make_interleaved(str(tmp_path / "i"), 4, bad=False)
    sections = [DatasetSection("pairs", "pairs", pairs["path"], 2, loss_weight=1.0),
                DatasetSection("mmc4", "interleaved", docs["path"], 2, options={"image_dir": docs["image_dir"]})]
    sources = build_sources(sections, processor, rank=0, world_size=1, seed=0, num_workers=0)
    assert set(sources) == {"pairs", "mmc4"}
    mix = WeightedMixture(sources, {"pairs": 3.0, "mmc4": 1.0}, seed=0)
    drawn = [next(mix) for _ in range(8)]
    state = mix.state_dict()
    after = [(n, b["keys"]) for n, b in (next(mix) for _ in range(4))]
    resumed = WeightedMixture(build_sources(sections, processor), {"pairs": 3.0, "mmc4": 1.0}, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # plain data, as checkpoints store it
    assert [(n, b["keys"]) for n, b in (next(resumed) for _ in range(4))] == after
    assert {n for n, _ in drawn} == {"pairs", "mmc4"}
    sampler = MixtureSampler({"pairs": 3.0, "mmc4": 1.0}, seed=0)
    assert [n for n, _ in drawn] == [sampler.draw() for _ in range(8)]  # the mixture draws with the one sampler


def test_weighted_mixture_refuses_weights_that_do_not_name_its_sources(tmp_path, processor):
    pairs = make_pairs(str(tmp_path / "p"), 2, bad=False)
    sources = build_sources([DatasetSection("pairs", "pairs", pairs["path"], 1)], processor)
    with pytest.raises(ValueError, match=r"no source \['pair'\]"):
        WeightedMixture(sources, {"pairs": 1.0, "pair": 3.0})  # a misspelt second name
    with pytest.raises(ValueError, match=r"no weight for \['pairs'\]"):
        WeightedMixture(sources, {"pair": 1.0})


def test_mixture_sampler_draws_as_torch_multinomial_with_a_seeded_generator():
    """The trainer's `sample` mode draws a dataset per step as `torch.multinomial(weights, 1)` with a generator seeded
    train.seed + 1: the sampler reproduces that sequence exactly and resumes it from its plain-data state."""
    weights = {"interleaved": 1.0, "pairs": 0.2, "video": 0.03}
    generator = torch.Generator().manual_seed(7)
    expected = [list(weights)[int(torch.multinomial(torch.tensor(list(weights.values())), 1, generator=generator))]
                for _ in range(60)]
    sampler = MixtureSampler(weights, seed=7)
    assert [sampler.draw() for _ in range(30)] == expected[:30]
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = MixtureSampler(weights, seed=123)
    resumed.load_state_dict(state)
    assert [resumed.draw() for _ in range(30)] == expected[30:]
    assert set(expected) == set(weights)


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": -0.5}, {"a": 0.0, "b": 0.0}, {}, {"a": float("nan"), "b": 1.0},
                                     {"a": float("inf"), "b": 1.0}, {"a": 1.0, "b": float("-inf")}])
def test_mixture_sampler_rejects_negative_all_zero_or_non_finite_weights(weights):
    """NaN and infinity would pass a `w < 0` test and fail in `torch.multinomial` at the first draw."""
    with pytest.raises(ValueError, match="mixture weights must be finite numbers >= 0 with at least one > 0"):
        MixtureSampler(weights, seed=0)
    if weights:  # the stand-alone mixture refuses them when built, too
        with pytest.raises(ValueError, match="mixture weights must be finite"):
            WeightedMixture({name: [] for name in weights}, weights)


def test_video_tar_shards_skip_bad_clips_and_sample_frames_at_1_fps(tmp_path, processor):
    data = make_pair_shards(str(tmp_path), 3, 2, video=True, seconds=2, bad=True)
    src = build_source(DatasetSection("v", "video", data["path"], 1, options={"max_frames": 4}), processor)
    batches = _epoch(src)
    assert len(batches) == 3 and src.skipped == {"bad_video": 1}
    assert all(b["num_frames"].tolist() == [[2]] for b in batches)  # 2 s at 1 FPS


def test_open_tar_shards_are_capped_and_the_evicted_shard_is_closed(tmp_path):
    shards = make_pair_shards(str(tmp_path), 10, 2)["files"]  # 5 shards, one more than stay open
    opened = [open_shard(path) for path in shards]
    assert opened[0]._file.closed and not any(s._file.closed for s in opened[1:])
    assert open_shard(shards[-1]) is opened[-1]  # an open shard is reused, not indexed again
    reopened = open_shard(shards[0])
    assert reopened is not opened[0] and not reopened._file.closed and opened[1]._file.closed


def test_a_shuffle_buffer_holding_more_shards_than_stay_open_loses_no_sample(tmp_path, processor):
    """Records wait in the buffer while later shards open and close earlier ones: a closed shard opens again. When
    the epoch ends, its shards are closed."""
    data = make_pair_shards(str(tmp_path), 12, 1)  # 12 shards of one sample, 3x the shards kept open
    src = build_source(DatasetSection("p", "pairs", data["path"], 1, options={"shuffle_buffer": 1000}), processor)
    batches = _epoch(src)
    assert src.skipped == {} and sorted(_keys(batches)) == sorted(f"shard-{i:06d}.tar:s{i:05d}" for i in range(12))
    from flamingo.data.sources import _OPEN_SHARDS

    assert len(_OPEN_SHARDS) == 0


def test_worker_loaders_leave_torch_global_generator_alone(tmp_path, processor):
    """Each epoch of a source with workers starts a DataLoader, whose base seed would come from torch's global
    generator, the one dropout draws from: a resumed run or a validation pass would then train differently."""
    data = make_pairs(str(tmp_path), 6, bad=False)
    src = build_source(DatasetSection("p", "pairs", data["path"], 3), processor, num_workers=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert _keys(_epoch(src))
    assert torch.equal(torch.rand(3), expected)


def test_worker_loaders_leave_the_process_environment_as_it_was(tmp_path, processor, monkeypatch):
    """Workers are forked with TOKENIZERS_PARALLELISM=false (they tokenize: HF warns otherwise), which stayed set in
    the process: a notebook's own tokenizer calls ran on one thread after any run with workers. It is unset again."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    data = make_pairs(str(tmp_path), 6, bad=False)
    src = build_source(DatasetSection("p", "pairs", data["path"], 3), processor, num_workers=1)
    assert _keys(_epoch(src))
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's own choice stays
    assert _keys(_epoch(src))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
