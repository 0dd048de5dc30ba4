"""Caches for many-epoch runs: the frozen tower's features by frame content (same loss, the tower skips frames it has
seen) and the data layer's preprocessed media (bit-identical batches, no decoding after the first epoch), both on one
least-recently-used store (`LRU`, also the tar shards' open-file cache)."""

import pickle
import warnings

import pytest
import torch

from flamingo.data import build_source
from flamingo.data.fixtures import make_interleaved, make_pairs, make_videos, tiny_processor
from flamingo.data.sources import MediaRef
from flamingo.model.feature_cache import VisionFeatureCache
from flamingo.runtime.lru import LRU, TensorCache
from flamingo.tiny import random_image
from flamingo.train.config import DatasetSection

PROMPT = "<image>a red circle<|endofchunk|><image>two squares<|endofchunk|><image>a circle again"


def _tower_frames(model):
    seen = []
    handle = model.vision.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    return seen, handle


def test_cached_features_give_the_same_loss_and_skip_seen_frames(make_model):
    model, processor = make_model()
    images = [random_image(0), random_image(1), random_image(0)]  # image 0 twice in one call
    batch = processor(PROMPT, images=images)
    batch["labels"] = batch["input_ids"].clone()
    other = processor(PROMPT, images=[random_image(2), random_image(1), random_image(3)])
    other["labels"] = other["input_ids"].clone()
    cache = VisionFeatureCache(2**20)
    seen, handle = _tower_frames(model)
    with torch.no_grad():
        plain = model(**batch).loss
        plain_other = model(**other).loss
        seen.clear()
        cold = model(**batch, vision_cache=cache).loss
        warm = model(**batch, vision_cache=cache).loss
        partly = model(**other, vision_cache=cache).loss
    handle.remove()
    assert seen == [2, 2]  # cold: two distinct frames; warm: none; other: the two frames not seen before
    assert torch.allclose(cold, plain, atol=1e-6) and torch.allclose(warm, plain, atol=1e-6)
    assert torch.allclose(partly, plain_other, atol=1e-6)
    assert len(cache.store) == 4 and cache.store.hits == 3  # warm: 2 distinct; other: image 1
    assert (cache.frames, cache.computed) == (9, 4)
    # a tower call that raises (an interrupt) computed nothing: counted nothing (the server reports these counts)
    handle = model.vision.register_forward_pre_hook(lambda m, args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**processor(PROMPT, images=[random_image(4)] * 3), vision_cache=cache)
    handle.remove()
    assert (cache.frames, cache.computed) == (9, 4) and len(cache.store) == 4


def test_feature_cache_needs_a_frozen_tower(make_model):
    model, processor = make_model(freeze_vision=False)
    batch = processor(PROMPT, images=[random_image(i) for i in range(3)])
    with pytest.raises(ValueError, match="frozen vision tower"):
        model(**batch, vision_cache=VisionFeatureCache(2**20))


def test_lru_count_budget_evicts_the_least_recently_used():
    store = LRU(3)
    for k in "abc":
        store.put(k, k.upper())
    assert store.get("a") == "A"  # a is now the most recent: b is the least
    store.put("d", "D")
    assert "b" not in store and [k in store for k in "acd"] == [True, True, True] and len(store) == 3
    store.put("c", "C2")  # replacing a key takes no extra room
    assert len(store) == 3 and store.get("c") == "C2" and store.hits == 2
    with pytest.raises(ValueError, match="positive budget"):
        LRU(0)


def test_lru_on_evict_gets_each_evicted_value():
    evicted = []
    store = LRU(2, on_evict=evicted.append)
    for k in "abcd":
        store.put(k, f"value {k}")
    assert evicted == ["value a", "value b"]


def test_lru_does_not_store_an_item_over_its_whole_budget():
    store = LRU(10, size_of=len)
    store.put("small", "x" * 6)
    store.put("huge", "x" * 11)
    assert "huge" not in store and store.get("small") == "x" * 6 and store.size == 6
    store.put("more", "x" * 5)  # 6 + 5 > 10: the older item leaves
    assert "small" not in store and store.size == 5


def test_lru_pickles_empty_with_its_budget():
    store = LRU(5, size_of=len)
    store.put("a", "abc")
    copy = pickle.loads(pickle.dumps(store))
    assert len(copy) == 0 and copy.size == 0 and copy.max_size == 5 and copy.size_of is len
    cache = TensorCache(1024)
    cache.put("t", torch.zeros(4))
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.max_bytes == 1024


def test_tensor_cache_evicts_least_recently_used_within_its_budget():
    cache = TensorCache(3 * 4 * 10)  # three float32 tensors of 10
    for k in "abc":
        cache.put(k, torch.full((10,), float(ord(k))))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(10))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    row = torch.zeros(100, 10)[0]  # a view of a larger tensor is stored as a compact copy
    cache.put("e", row)
    assert cache.get("e").untyped_storage().nbytes() == 40 and cache.bytes <= cache.max_bytes
    cache.put("huge", torch.zeros(1000))  # larger than the budget: not stored
    assert cache.get("huge") is None
    assert TensorCache.of_mib(0) is None
    assert TensorCache.of_mib(1e-9).max_bytes == 1  # any size > 0 keeps a cache, never a refused 0-byte budget
    for bad in (-1, float("inf"), float("nan")):  # inf never evicts, NaN read as off
        with pytest.raises(ValueError, match="finite number >= 0 MiB"):
            TensorCache.of_mib(bad)
        with pytest.raises(ValueError, match="a vision feature cache needs a size"):
            VisionFeatureCache.of_mib(bad)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _two_epochs(section, processor, monkeypatch):
    loads = []  # (medium, whether its read succeeded)
    real = MediaRef.load

    def load(self, **kw):
        try:
            frames = real(self, **kw)
        except Exception:
            loads.append((self.name, False))
            raise
        loads.append((self.name, True))
        return frames

    monkeypatch.setattr(MediaRef, "load", load)
    src = build_source(section, processor, seed=3)
    epochs, per_epoch = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            before = len(loads)
            epochs.append(list(src))
            per_epoch.append(loads[before:])
    return epochs, per_epoch, src


@pytest.mark.parametrize("source", ["pairs", "interleaved", "interleaved-tar", "video"])
def test_media_cache_gives_identical_batches_without_decoding_again(tmp_path, processor, monkeypatch, source):
    root = str(tmp_path)
    data = {"pairs": lambda: make_pairs(root, 9), "interleaved": lambda: make_interleaved(root, 8),
            "interleaved-tar": lambda: make_interleaved(root, 8, tar_shards=2),
            "video": lambda: make_videos(root, 4, seconds=2)}[source]()
    kind = source.split("-")[0]
    options = {"drop_last": False, "shuffle_buffer": 4, **({"image_dir": data["image_dir"]}
                                                           if data.get("image_dir") else {})}
    plain, _, plain_src = _two_epochs(DatasetSection("d", kind, data["path"], 2, options=options), processor,
                                      monkeypatch)
    cached, loads, src = _two_epochs(
        DatasetSection("d", kind, data["path"], 2, options={**options, "cache_media_mib": 8}), processor, monkeypatch)
    for a_epoch, b_epoch in zip(plain, cached):
        assert len(a_epoch) == len(b_epoch)
        for a, b in zip(a_epoch, b_epoch):
            assert a["keys"] == b["keys"] and torch.equal(a["input_ids"], b["input_ids"])
            assert (a["images"] is None and b["images"] is None) or torch.equal(a["images"], b["images"])
    assert src.skipped == plain_src.skipped  # bad media are skipped and counted in every epoch, never cached
    first, second = loads
    assert src.spec.media_cache.hits > 0 and any(ok for _, ok in first)
    # epoch 2 reads only what epoch 1 could not decode, and inline (base64) media, which have no stable name
    assert all(not ok or name.endswith(":base64") for name, ok in second), second
