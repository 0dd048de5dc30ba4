"""Sequence building: MMC4 matching (greedy, threshold), chunk markers, max_images / max_tokens, labels."""

import json

import numpy as np
import pytest
import torch

from flamingo.config import END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN
from flamingo.data import build_interleaved_text, make_labels, match_images
from flamingo.data.fixtures import colour, image_bytes, mmc4_document, tiny_processor, write_jsonl
from flamingo.data.sequence import IGNORE_INDEX, collate
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec
from flamingo.processing import FlamingoProcessor
from flamingo.tiny import tiny_image_processor, tiny_tokenizer


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def test_greedy_matching_by_similarity_one_to_one():
    sim = np.array([[0.90, 0.30, 0.95],   # image 0
                    [0.80, 0.10, 0.96],   # image 1
                    [0.20, 0.50, 0.10]])  # image 2
    # 0.96: img1->s2; 0.95 (img0, s2) loses s2; 0.90: img0->s0; 0.80 loses; 0.50: img2->s1.
    assert match_images(sim, 0.4) == {2: 1, 0: 0, 1: 2}
    assert match_images(sim, 0.6) == {2: 1, 0: 0}  # image 2's best (0.5) is under the threshold
    assert match_images(sim, 0.5) == {2: 1, 0: 0, 1: 2}  # at the threshold counts
    assert match_images(sim, 0.99) == {}


def test_image_goes_before_its_sentence_and_endofchunk_closes_each_chunk():
    text = build_interleaved_text(["A.", "B.", "C.", "D."], [1, 3], eos="<E>")
    assert text == "A.<image>B. C.<|endofchunk|><image>D.<|endofchunk|><E>"
    assert build_interleaved_text(["A.", "B."], [0]) == "<image>A. B.<|endofchunk|>"


def test_labels_mask_text_before_the_first_image_and_image_tokens():
    assert make_labels([5, 6, 9, 7, 9, 8], media_token_id=9) == [-100, -100, -100, 7, -100, 8]


def _spec(tmp_path, docs, processor, **options):
    images = tmp_path / "img"
    images.mkdir(exist_ok=True)
    for i in range(8):
        (images / f"img{i}.png").write_bytes(image_bytes(i))
    path = write_jsonl(str(tmp_path / "docs.jsonl"), docs)
    spec = DatasetSpec.create("mmc4", "interleaved", path, 2, {"image_dir": str(images), **options}, processor)
    return spec, list(read_records(path))


def test_document_keeps_images_in_text_order_with_labels_and_pixels(tmp_path, processor):
    # 5 sentences; image 0 -> sentence 3, image 1 -> sentence 1, image 2 below threshold everywhere.
    doc = mmc4_document(5, {0: 3, 1: 1}, n_images=3, sim=0.9, noise=0.1)
    spec, records = _spec(tmp_path, [doc], processor, similarity_threshold=0.24)
    example = spec.example(records[0])
    # Images come in text order: image 1 (before sentence 1) first, then image 0 (before sentence 3).
    assert [m.name.rsplit("/", 1)[-1] for m in example.media] == ["img1.png", "img0.png"]
    assert example.text == ("Sentence 0 is here.<image>Sentence 1 is here. Sentence 2 is here.<|endofchunk|>"
                            "<image>Sentence 3 is here. Sentence 4 is here.<|endofchunk|><|endoftext|>")
    enc = spec.encode(records[0])
    ids, labels = enc.input_ids, enc.labels
    media_id, eoc_id = processor.media_token_id, processor.end_of_chunk_token_id
    first = ids.index(media_id)
    assert ids.count(media_id) == len(enc.media) == 2
    assert all(x == IGNORE_INDEX for x in labels[: first + 1])  # "Sentence 0 is here." and the <image>: masked
    assert labels[first + 1] == ids[first + 1]  # the first token after the first image is trained
    second = ids.index(media_id, first + 1)
    assert labels[second] == IGNORE_INDEX and labels[second - 1] == eoc_id == ids[second - 1]
    # The pixels of medium 0 are image 1's colour.
    expected = processor.image_processor(images=[_solid(1)], return_tensors="pt")["pixel_values"]
    assert torch.allclose(enc.media[0], expected) and not torch.allclose(enc.media[1], expected)


def test_a_documents_final_eos_is_trained_where_openflamingo_masks_it(tmp_path, processor):
    """The one token where our labels differ from OpenFlamingo's MMC4 labelling (it masks what follows each
    `<|endofchunk|>` up to the next `<image>`): the final EOS, trained so the model learns to end a document."""
    spec, records = _spec(tmp_path, [mmc4_document(4, {0: 1, 1: 3})], processor)
    enc = spec.encode(records[0])
    ids, labels, eoc = enc.input_ids, enc.labels, processor.end_of_chunk_token_id
    assert ids[-2:] == [eoc, processor.tokenizer.eos_token_id] and labels[-1] == ids[-1]
    after_chunks = [t + 1 for t, tok in enumerate(ids) if tok == eoc and t + 1 < len(ids)]
    assert [ids[t] for t in after_chunks] == [processor.media_token_id, processor.tokenizer.eos_token_id]


def _solid(i):
    from PIL import Image

    return Image.new("RGB", (16, 16), colour(i))


def test_threshold_drops_weak_matches_and_max_images_keeps_the_first(tmp_path, processor):
    doc = mmc4_document(8, {0: 1, 1: 3, 2: 5, 3: 7}, sim=0.3)
    spec, records = _spec(tmp_path, [doc], processor, similarity_threshold=0.24, max_images=2)
    ex = spec.example(records[0])
    assert ex.text.count("<image>") == 2 and len(ex.media) == 2  # the first two in document order
    assert [m.name.rsplit("/", 1)[-1] for m in ex.media] == ["img0.png", "img1.png"]
    spec, records = _spec(tmp_path, [doc], processor, similarity_threshold=0.5)
    from flamingo.data.errors import SkipSample

    with pytest.raises(SkipSample) as e:
        spec.example(records[0])
    assert e.value.reason == "no_matched_image"


def test_a_document_whose_entries_name_no_image_is_skipped_saying_so(tmp_path, processor):
    """URL-only image entries (MMC4 rows not yet downloaded) were skipped as "no image matches a sentence at
    similarity >= 0.24" though each matched at 0.9: the reason is that none names an image."""
    from flamingo.data.errors import SkipSample

    doc = {"text_list": ["a cat.", "a dog."], "image_info": [{"url": "http://x/y.jpg", "matched_text_index": 0,
                                                            "matched_sim": 0.9}]}
    spec, records = _spec(tmp_path, [doc], processor)
    with pytest.raises(SkipSample, match="no image entry names an image") as e:
        spec.example(records[0])
    assert e.value.reason == "no_matched_image"


@pytest.mark.parametrize("score", [None, "high", [0.9]])
def test_a_matched_sim_that_is_no_number_skips_the_document(tmp_path, processor, score):
    from flamingo.data.errors import SkipSample

    doc = mmc4_document(4, {0: 1, 1: 3})
    del doc["similarity_matrix"]  # MMC4 core style: each image's matched_text_index and matched_sim
    doc["image_info"][1]["matched_sim"] = score
    spec, records = _spec(tmp_path, [doc], processor)
    with pytest.raises(SkipSample, match="matched_sim") as e:
        spec.example(records[0])
    assert e.value.reason == "bad_record"


def test_max_tokens_drops_images_past_the_cut(tmp_path, processor):
    doc = mmc4_document(6, {0: 1, 1: 4})
    spec, records = _spec(tmp_path, [doc], processor)
    full = spec.encode(records[0]).input_ids
    media_id = processor.media_token_id
    second = [t for t, x in enumerate(full) if x == media_id][1]
    for cut, n_media in ((second, 1), (second + 1, 1), (second + 2, 2)):  # cut at/after the 2nd <image>
        spec.options["max_tokens"] = cut
        enc = spec.encode(records[0])
        assert len(enc.input_ids) <= cut and enc.input_ids == full[: len(enc.input_ids)]
        assert enc.input_ids.count(media_id) == len(enc.media) == n_media
        assert enc.input_ids[-1] != media_id  # never ends on an image with no text


def test_literal_markers_in_text_are_removed_and_batches_count_media(tmp_path, processor):
    doc = mmc4_document(3, {0: 1})
    doc["text_list"][2] = "tricky <image> and <|endofchunk|> in text"
    spec, records = _spec(tmp_path, [doc, json.loads(json.dumps(mmc4_document(2, {0: 0, 1: 1})))], processor)
    encoded = [spec.encode(r) for r in records]
    assert [e.input_ids.count(processor.media_token_id) for e in encoded] == [1, 2]
    batch = collate(encoded, processor, "right")
    assert batch["num_media"].tolist() == [1, 2] and batch["images"].shape[:3] == (2, 2, 1)
    assert batch["num_frames"].tolist() == [[1, 0], [1, 1]]
    for b in range(2):
        ids = batch["input_ids"][b]
        assert int((ids == processor.media_token_id).sum()) == int(batch["num_media"][b])
        pad = batch["attention_mask"][b] == 0
        assert (batch["labels"][b][pad] == IGNORE_INDEX).all()
        assert (batch["labels"][b][ids == processor.media_token_id] == IGNORE_INDEX).all()


def _idefics_processor(*, end_of_utterance: bool = False):
    """A converted IDEFICS model's processor: its tokenizer has `<image>` and `<fake_token_around_image>` (and the
    instruct models' `<end_of_utterance>`), no `<|endofchunk|>`."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN]
                            + ([END_OF_UTTERANCE] if end_of_utterance else [])})
    tok.pad_token = tok.eos_token
    return FlamingoProcessor(tok, tiny_image_processor(), template="idefics")


@pytest.mark.parametrize("end_of_utterance", [False, True])
def test_an_idefics_tokenizer_without_endofchunk_gets_no_chunk_marker(tmp_path, end_of_utterance):
    """IDEFICS trains nothing between an image's text and the next image and ends a pair or document with EOS: so
    do pairs and documents for a tokenizer without `<|endofchunk|>` (never the marker's characters, never
    `<end_of_utterance>`, a dialogue's turn end)."""
    processor = _idefics_processor(end_of_utterance=end_of_utterance)
    tok = processor.tokenizer
    doc = mmc4_document(4, {0: 1, 1: 3})
    spec, records = _spec(tmp_path, [doc], processor, max_tokens=1000)
    assert spec.chunk_end == ""
    example = spec.example(records[0])
    assert example.text == ("Sentence 0 is here.<image>Sentence 1 is here. Sentence 2 is here.<image>"
                            "Sentence 3 is here.<|endoftext|>")
    pairs = write_jsonl(str(tmp_path / "pairs.jsonl"), [{"image": "img/img0.png", "caption": "a red square."}])
    pair_spec = DatasetSpec.create("p", "pairs", pairs, 1, None, processor)
    (pair,) = [pair_spec.encode(r) for r in read_records(pairs)]
    assert pair.input_ids == processor.prompt_ids("<image>a red square." + tok.eos_token)
    for ids in (spec.encode(records[0]).input_ids, pair.input_ids):
        assert "endofchunk" not in tok.decode(ids)
        assert tok.convert_tokens_to_ids(END_OF_UTTERANCE) not in ids or not end_of_utterance
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 2  # BOS (the same id) and EOS


def test_idefics_truncation_drops_an_image_and_its_wrappers_left_with_no_text(tmp_path):
    """The wrappers follow each `<image>`: a cut right after an image (or inside its wrappers) drops it with them."""
    processor = _idefics_processor()
    wrapper = processor.tokenizer.convert_tokens_to_ids(IDEFICS_IMAGE_WRAPPER)
    doc = mmc4_document(4, {0: 1, 1: 2, 2: 3})
    spec, records = _spec(tmp_path, [doc], processor, max_tokens=1000)
    full = spec.encode(records[0]).input_ids
    second = [t for t, x in enumerate(full) if x == processor.media_token_id][1]
    assert full[second - 1] == full[second + 1] == wrapper
    for cut in (second, second + 1, second + 2):  # cut before, at and after the second image's closing wrapper
        spec.options["max_tokens"] = cut
        enc = spec.encode(records[0])
        assert len(enc.media) == enc.input_ids.count(processor.media_token_id) == 1
        assert enc.input_ids[-1] not in (wrapper, processor.media_token_id)
        assert enc.input_ids == full[:len(enc.input_ids)]
    spec.options["max_tokens"] = second + 3  # one text token after the second image: it stays
    assert len(spec.encode(records[0]).media) == 2
