"""Interleaved image placement: MMC4's `matched_text_index` is placed as given, an image without one by its
similarity-matrix row (greedy one-to-one), and an index that names no sentence skips the document."""

from __future__ import annotations

import os

import pytest

from flamingo.config import MEDIA_TOKEN
from flamingo.data.errors import SkipSample
from flamingo.data.fixtures import image_bytes, write_jsonl
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec

SENTENCES = ["Zero.", "One.", "Two."]
# Greedy by score takes (image 0, sentence 0) at 0.90 and leaves image 1 nothing above the threshold; MMC4's linear
# assignment gives image 0 sentence 1 and image 1 sentence 0 (0.85 + 0.88 > 0.90 + 0.10).
MATRIX = [[0.90, 0.85, 0.0], [0.88, 0.10, 0.0]]


def _example(tmp_path, doc, **options):
    images = tmp_path / "img"
    images.mkdir(exist_ok=True)
    for i in range(len(doc["image_info"])):
        (images / f"img{i}.png").write_bytes(image_bytes(i))
    path = write_jsonl(str(tmp_path / "docs.jsonl"), [doc])
    spec = DatasetSpec.create("mmc4", "interleaved", path, 1, {"image_dir": str(images), **options}, None)
    return spec.example(next(read_records(path)))


def _placed(example) -> list[tuple[str, str]]:
    """(sentence, image name) of each placed image, in document order."""
    chunks = example.text.split(MEDIA_TOKEN)[1:]
    return [(chunk.split(".")[0] + ".", os.path.basename(m.name)) for chunk, m in zip(chunks, example.media)]


def _doc(info, matrix=MATRIX):
    doc = {"text_list": SENTENCES, "image_info": info}
    if matrix is not None:
        doc["similarity_matrix"] = matrix
    return doc


def test_an_mmc4_records_matched_text_index_is_placed_as_given(tmp_path):
    info = [
        {"image_name": "img0.png", "matched_text_index": 1, "matched_sim": 0.85},
        {"image_name": "img1.png", "matched_text_index": 0, "matched_sim": 0.88},
    ]
    assert _placed(_example(tmp_path, _doc(info))) == [("Zero.", "img1.png"), ("One.", "img0.png")]


def test_without_matched_text_index_images_are_placed_greedily_by_their_matrix_rows(tmp_path):
    info = [{"image_name": "img0.png"}, {"image_name": "img1.png"}]
    assert _placed(_example(tmp_path, _doc(info))) == [("Zero.", "img0.png")]
    mixed = [{"image_name": "img0.png", "matched_text_index": 1}, {"image_name": "img1.png"}]  # 0.85 by its entry
    assert _placed(_example(tmp_path, _doc(mixed))) == [("Zero.", "img1.png"), ("One.", "img0.png")]
    outscored = [{"image_name": "img0.png"}, {"image_name": "img1.png", "matched_text_index": 0}]  # 0.90 > 0.88
    assert _placed(_example(tmp_path, _doc(outscored))) == [("Zero.", "img0.png")]


def test_a_given_index_is_placed_only_at_or_above_the_threshold_and_one_image_per_sentence(tmp_path):
    info = [
        {"image_name": "img0.png", "matched_text_index": 1},  # no matched_sim: its matrix entry, 0.85
        {"image_name": "img1.png", "matched_text_index": 1, "matched_sim": 0.95},
    ]  # the same sentence
    assert _placed(_example(tmp_path, _doc(info))) == [("One.", "img1.png")]  # the higher score keeps it
    assert _placed(_example(tmp_path, _doc(info), similarity_threshold=0.9)) == [("One.", "img1.png")]
    core = [{"image_name": "img0.png", "matched_text_index": 2.0}]  # no matrix, no score: placed as given
    assert _placed(_example(tmp_path, _doc(core, matrix=None))) == [("Two.", "img0.png")]


@pytest.mark.parametrize("index", [3, -1, "1", True, 1.5])
def test_a_matched_text_index_that_names_no_sentence_skips_the_document(tmp_path, index):
    info = [{"image_name": "img0.png", "matched_text_index": index, "matched_sim": 0.9}]
    with pytest.raises(SkipSample, match="matched_text_index") as e:
        _example(tmp_path, _doc(info, matrix=None))
    assert e.value.reason == "bad_record"
