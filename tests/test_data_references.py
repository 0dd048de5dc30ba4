"""Training text and the model's image references: a `<imagek>` the model has no token for is skipped and counted in
every kind (as the processor refuses it in a prompt); and samples that `max_tokens` cut are counted and warned about,
not cut silently."""

from __future__ import annotations

import json
import warnings

import pytest

from flamingo.data.build import build_source
from flamingo.data.errors import SkipSample
from flamingo.data.fixtures import mmc4_document, tiny_processor
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec
from flamingo.processing import FlamingoProcessor, add_flamingo_tokens
from flamingo.tiny import random_image, tiny_image_processor, tiny_tokenizer
from flamingo.train.config import DatasetSection

CAPTION = "Image 0 is <image0>. Image 1 is <image1>. Question:What colour is the object in <image0>? Short answer:red"


def _ref_processor(num_references: int) -> FlamingoProcessor:
    """The tiny tokenizer with `num_references` reference tokens, as `from_backbones` adds them."""
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok, num_references)
    return FlamingoProcessor(tok, tiny_image_processor(), max_frames=4)


def _images(tmp_path, n=3):
    for i in range(n):
        random_image(i).save(tmp_path / f"{i}.png")


def _write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _encode_all(path, kind, processor, **options):
    """Each record -> its `Encoded`, or the `SkipSample` it raised."""
    spec = DatasetSpec.create("d", kind, path, 1, {"shuffle": False, **options}, processor)
    out = []
    for record in read_records(path):
        try:
            out.append(spec.encode(record))
        except SkipSample as e:
            out.append(e)
    return out


def test_a_declared_pair_row_needs_a_reference_token_per_image(tmp_path):
    """A row declaring more images than the model has reference tokens for is `bad_record`, with the processor's
    message for the same prompt; one within them is read as the processor reads that prompt."""
    _images(tmp_path)
    three = "Image 0 is <image0>. Image 1 is <image1>. Image 2 is <image2>. Is <image2> red? Short answer:yes"
    path = _write(tmp_path, [{"images": ["0.png", "1.png"], "caption": CAPTION},
                             {"images": ["0.png", "1.png", "2.png"], "caption": three}])
    for refs, expected in ((0, ["<image0>: the model has no image reference tokens"] * 2),
                           (2, [None, "<image2>: the model has reference tokens for images 0-1"])):
        processor = _ref_processor(refs)
        for out, message, (caption, n) in zip(_encode_all(path, "pairs", processor, max_tokens=128), expected,
                                              ((CAPTION, 2), (three, 3))):
            if message is None:
                assert not isinstance(out, SkipSample)
                ids, _ = processor.encode_prompt(caption + "<|endofchunk|>" + processor.tokenizer.eos_token,
                                                 [random_image(i) for i in range(n)], image_references=True)
                assert out.input_ids == ids
                continue
            assert isinstance(out, SkipSample) and out.reason == "bad_record" and message in str(out)
            with pytest.raises(ValueError, match=message):  # the processor's word for the same prompt
                processor.encode_prompt(caption, [random_image(i) for i in range(n)], image_references=True)


def test_a_reference_past_the_models_tokens_skips_a_document_or_a_conversation(tmp_path):
    """Interleaved and chat text alike: `<image2>` on a model with tokens for images 0-1 (or `<image01>`, no token
    either) is `bad_record` naming the tag and K; `<image1>` is the reference token."""
    _images(tmp_path)
    processor = _ref_processor(2)
    for tag, bad in (("<image1>", None), ("<image2>", "<image2>: the model has reference tokens for images 0-1"),
                     ("<image01>", "<image01>: image indices have no leading zeros")):
        doc = mmc4_document(3, {0: 0, 1: 1}, image_names=["0.png", "1.png"])
        doc["text_list"][2] = f"The shape in {tag} is red."
        question = {"from": "human", "value": f"<image><image>\nIs {tag} red?"}  # images 0 and 1 shown before it
        chat = {"image": ["0.png", "1.png"], "conversations": [question, {"from": "gpt", "value": "Yes."}]}
        for kind, row in (("interleaved", doc), ("chat", chat)):
            out, = _encode_all(_write(tmp_path, [row], f"{kind}.jsonl"), kind, processor)
            if bad is None:
                assert processor.tokenizer.convert_tokens_to_ids(tag) in out.input_ids
            else:
                assert isinstance(out, SkipSample) and out.reason == "bad_record" and bad in str(out), (kind, out)


def test_a_source_counts_the_skip(tmp_path):
    _images(tmp_path)
    path = _write(tmp_path, [{"images": ["0.png", "1.png"], "caption": CAPTION}] * 2
                  + [{"image": "0.png", "caption": "a plain caption"}] * 2)
    source = build_source(DatasetSection("p", "pairs", path, batch_size=2, options={"shuffle": False}),
                          _ref_processor(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(source)) == 1
    assert source.skipped == {"bad_record": 2}


def test_samples_cut_by_max_tokens_are_counted_and_warned_about_once(tmp_path):
    """A pairs source whose captions are longer than `max_tokens`: each such sample is counted (`truncated`, in the
    state and across a resume), the first is warned about by name, the epoch's report gives the number; batches hold
    no extra entry."""
    _images(tmp_path)
    long_caption = "A caption far longer than the few tokens this source keeps of it, so its end is cut."
    rows = [{"image": "0.png", "caption": long_caption}, {"image": "1.png", "caption": "red"}] * 2
    path = _write(tmp_path, rows)
    section = DatasetSection("p", "pairs", path, batch_size=2, options={"shuffle": False, "max_tokens": 16})
    source = build_source(section, tiny_processor())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(source)
    assert len(batches) == 2 and all("truncated" not in b for b in batches)
    messages = [str(w.message) for w in caught]
    first = [m for m in messages if "was cut" in m]
    assert len(first) == 1 and "rows.jsonl:1" in first[0] and "max_tokens=16" in first[0]
    assert any("2 of them cut by max_tokens=16" in m for m in messages)  # the epoch's report
    assert source.truncated == 2
    state = json.loads(json.dumps(source.state_dict()))
    again = build_source(section, tiny_processor())
    again.load_state_dict(state)
    assert again.truncated == 2
    # a source whose samples all fit counts none and says nothing
    fits = build_source(DatasetSection("q", "pairs", path, batch_size=2, options={"shuffle": False,
                                                                                   "max_tokens": 64}),
                        tiny_processor())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(fits)
    assert fits.truncated == 0 and not caught
