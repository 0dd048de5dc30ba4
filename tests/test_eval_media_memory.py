"""The evaluation's media cache (`MediaLoader`) is bounded by bytes of pixels, not by a count: many 8-frame videos
stay under its budget, images keep at least the 512 a count kept, and a cached medium is served without decoding it
again."""

import pytest
import torch

from flamingo.eval.predict import MEDIA_CACHE_BYTES, MediaLoader
from flamingo.tiny import random_image, tiny_flamingo

IMAGE = (1, 3, 224, 224)  # one 224-px image, (F, C, H, W): 588 KiB of float32
VIDEO = (8, 3, 224, 224)  # an 8-frame 224-px video: 4.6 MiB


class Decoder:
    """A processor whose media are `shape` tensors, counting decodes. The tensors are one value broadcast (no
    memory held), so hundreds of full-size media cost nothing while the cache counts each one's full size."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape, self.decoded = shape, []

    def preprocess_media(self, path: str) -> torch.Tensor:
        self.decoded.append(path)
        return torch.full((1,), float(len(self.decoded))).expand(self.shape)


def _held_bytes(loader: MediaLoader, paths: list[str]) -> int:
    return sum(t.numel() * t.element_size() for p in paths if (t := loader.cache.peek(p)) is not None)


def test_many_videos_stay_under_the_byte_budget_by_default():
    loader = MediaLoader(Decoder(VIDEO))
    paths = [f"v{i}.mp4" for i in range(600)]
    for p in paths:
        loader(p)
    held = [p for p in paths if loader.cache.peek(p) is not None]
    assert 0 < _held_bytes(loader, paths) <= MEDIA_CACHE_BYTES == 2**30
    assert len(held) == MEDIA_CACHE_BYTES // (8 * 3 * 224 * 224 * 4) and held == paths[-len(held) :]  # the latest


def test_the_default_budget_keeps_at_least_as_many_images_as_a_count_of_512():
    decoder = Decoder(IMAGE)
    loader = MediaLoader(decoder)
    paths = [f"{i}.png" for i in range(600)]
    for p in paths:
        loader(p)
    for p in paths:  # all still there: no decode
        loader(p)
    assert len(decoder.decoded) == 600 and _held_bytes(loader, paths) <= MEDIA_CACHE_BYTES


def test_hits_are_served_without_decoding_and_the_least_recent_leaves():
    decoder = Decoder(VIDEO)
    video = 8 * 3 * 224 * 224 * 4
    loader = MediaLoader(decoder, max_bytes=3 * video)
    first = loader("a")
    assert torch.equal(loader("a"), first) and decoder.decoded == ["a"]  # a hit: decoded once
    for p in ("b", "a", "c", "d"):  # "a" used again: "b" is the least recent when "d" needs room
        loader(p)
    assert decoder.decoded == ["a", "b", "c", "d"] and _held_bytes(loader, ["a", "b", "c", "d"]) == 3 * video
    assert loader.cache.peek("b") is None and torch.equal(loader("a"), first) and loader.cache.hits == 3
    assert MediaLoader(decoder, max_bytes=video - 1)("e").shape == VIDEO  # larger than the budget: served, not kept
    with pytest.raises(ValueError, match="positive budget"):
        MediaLoader(decoder, max_bytes=0)


def test_a_real_image_is_decoded_once_and_counted_by_its_bytes(tmp_path):
    _, processor = tiny_flamingo()
    random_image(0).save(tmp_path / "0.png")
    loader = MediaLoader(processor)
    pixels = loader(str(tmp_path / "0.png"))
    assert torch.equal(loader(str(tmp_path / "0.png")), pixels) and loader.cache.hits == 1
    assert loader.cache.bytes == pixels.numel() * pixels.element_size()
