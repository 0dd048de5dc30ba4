"""Odd records never stop a run or leak into the model's special tokens: text with half an emoji (a lone UTF-16
surrogate) is kept with U+FFFD in its place, an inline image that is no base64 string is skipped and counted, and
special-token strings the data spells out (`</s>`, `<|endoftext|>`, `<PAD>`) are tokenized as plain text."""

from __future__ import annotations

import json

import pytest

from flamingo.config import IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN
from flamingo.data import build_source
from flamingo.data.errors import SkipSample
from flamingo.data.fixtures import image_bytes, make_pairs, mmc4_document, tiny_processor, write_jsonl
from flamingo.data.inspect import inspect_dataset
from flamingo.data.sequence import IGNORE_INDEX
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec
from flamingo.processing import FlamingoProcessor
from flamingo.runtime.text import valid_text
from flamingo.tiny import tiny_image_processor
from flamingo.train.config import DatasetSection

HALF_EMOJI = "emoji half \ud83d here"  # valid JSON ("\ud83d"), not valid Unicode


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _table(tmp_path, rows, name="rows.jsonl"):
    """`rows` as JSONL next to `img/0.png` ... `img/3.png`."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i))
    return write_jsonl(str(tmp_path / name), rows)


def _encode(path, kind, processor, **options):
    spec = DatasetSpec.create("d", kind, path, 1, {"shuffle": False, **options}, processor)
    return spec, [spec.encode(record) for record in read_records(path)]


def test_valid_text_replaces_each_lone_surrogate_by_one_character():
    assert valid_text(HALF_EMOJI) == "emoji half \ufffd here"
    whole = json.loads('"a \\ud83d\\ude00 pair"')  # JSON joins a whole pair into one character
    assert len(whole) == 8 and valid_text(whole) == whole
    assert valid_text("ok") == "ok"


def test_half_an_emoji_is_kept_in_every_kind_and_by_inspect(tmp_path, processor):
    """The run goes on: the caption, the sentence and the answer keep their sample, the broken character read as
    U+FFFD (as a tar caption's broken bytes are); the answer's labels still cover exactly the answer."""
    pairs = _table(tmp_path, [{"image": "img/0.png", "caption": HALF_EMOJI}])
    _, (pair,) = _encode(pairs, "pairs", processor)
    assert "\ufffd" in processor.tokenizer.decode(pair.input_ids)

    doc = mmc4_document(3, {0: 1}, image_names=["0.png"])
    doc["text_list"][1] = HALF_EMOJI
    docs = _table(tmp_path, [doc], "docs.jsonl")
    _, (document,) = _encode(docs, "interleaved", processor, image_dir=str(tmp_path / "img"))
    assert "\ufffd" in document.text

    chat = _table(tmp_path, [{"image": "img/0.png", "conversations": [
        {"from": "human", "value": "<image>What is it? \ud83d"}, {"from": "gpt", "value": HALF_EMOJI}]}], "c.jsonl")
    _, (conversation,) = _encode(chat, "chat", processor)
    trained = [t for t, label in zip(conversation.input_ids, conversation.labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained).strip() == "emoji half \ufffd here<|endofchunk|>"

    for with_tokenizer in (processor, None):
        report = inspect_dataset(pairs, "pairs", processor=with_tokenizer)
        assert report.samples == 1 and report.skipped == {}


@pytest.mark.parametrize("encoded", [12345, ["aGVsbG8="], {"data": "aGVsbG8="}])
def test_an_inline_image_that_is_no_string_skips_its_document(tmp_path, processor, encoded):
    good = mmc4_document(3, {0: 1}, inline=[image_bytes(0)])
    bad = mmc4_document(3, {0: 1}, inline=[image_bytes(1)])
    bad["image_info"][0]["image_base64"] = encoded
    path = _table(tmp_path, [good, bad], "docs.jsonl")
    spec = DatasetSpec.create("d", "interleaved", path, 1, {"shuffle": False}, processor)
    with pytest.raises(SkipSample, match="image_base64 must be a string") as e:
        spec.example(list(read_records(path))[1])
    assert e.value.reason == "bad_record"
    src = build_source(DatasetSection("d", "interleaved", path, 1, options={"shuffle": False}), processor)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(list(src)) == 1
    assert src.skipped == {"bad_record": 1}


SPELLED = "a </s> b <|endoftext|> c <PAD> d"  # the tiny tokenizer's EOS is <|endoftext|>, its pad <PAD>


def test_special_token_strings_in_a_caption_are_plain_text(tmp_path, processor):
    """EOS and pad ids come only where the sequence puts them (its end); the caption's spelled-out ones are its
    characters, trained like the rest of it."""
    tok = processor.tokenizer
    path = _table(tmp_path, [{"image": "img/0.png", "caption": SPELLED}])
    _, (sample,) = _encode(path, "pairs", processor, max_tokens=200)
    assert sample.input_ids.count(tok.eos_token_id) == 1 and sample.input_ids[-1] == tok.eos_token_id
    assert tok.pad_token_id not in sample.input_ids
    assert tok.decode(sample.input_ids) == f"{MEDIA_TOKEN}{SPELLED}<|endofchunk|><|endoftext|>"
    assert sample.labels[1:] == sample.input_ids[1:]  # all trained after the image, as text
    # the caption's text is tokenized as it is without the special strings' parsing: only they change
    plain = tok(SPELLED, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(sample.input_ids) == 1 + len(plain) + 2


def test_special_token_strings_in_documents_and_answers_are_plain_text(tmp_path, processor):
    tok = processor.tokenizer
    doc = mmc4_document(3, {0: 1}, image_names=["0.png"])
    doc["text_list"][2] = SPELLED
    docs = _table(tmp_path, [doc], "docs.jsonl")
    _, (document,) = _encode(docs, "interleaved", processor, image_dir=str(tmp_path / "img"))
    assert document.input_ids.count(tok.eos_token_id) == 1 and tok.pad_token_id not in document.input_ids

    chat = _table(tmp_path, [{"image": "img/0.png", "conversations": [
        {"from": "human", "value": f"<image>{SPELLED}?"}, {"from": "gpt", "value": SPELLED}]}], "c.jsonl")
    _, (conversation,) = _encode(chat, "chat", processor, append_eos=True)
    specials = [t for t in conversation.input_ids if t in (tok.eos_token_id, tok.pad_token_id)]
    assert specials == [tok.eos_token_id] and conversation.input_ids[-1] == tok.eos_token_id
    trained = [t for t, label in zip(conversation.input_ids, conversation.labels) if label != IGNORE_INDEX]
    assert tok.decode(trained).strip() == f"{SPELLED}<|endofchunk|><|endoftext|>"


def test_markers_the_sequence_is_built_from_stay_special(tmp_path):
    """MMGPT's answers end with EOS (each one, a marker of its format) and IDEFICS's sequences start with BOS: those
    stay special; the same strings in the data do not."""
    processor = tiny_processor()
    mmgpt = FlamingoProcessor(processor.tokenizer, tiny_image_processor(), template="mmgpt")
    tok = mmgpt.tokenizer
    chat = _table(tmp_path, [{"image": "img/0.png", "conversations": [
        {"from": "human", "value": "<image>Colour? <PAD>"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "Square."}]}], "c.jsonl")
    _, (conversation,) = _encode(chat, "chat", mmgpt)
    assert conversation.input_ids.count(tok.eos_token_id) == 2 and tok.pad_token_id not in conversation.input_ids
    eos_labels = [label for t, label in zip(conversation.input_ids, conversation.labels) if t == tok.eos_token_id]
    assert eos_labels == [tok.eos_token_id] * 2

    idefics_tok = tiny_processor().tokenizer
    idefics_tok.add_special_tokens({"additional_special_tokens": [IDEFICS_IMAGE_WRAPPER]})
    idefics = FlamingoProcessor(idefics_tok, tiny_image_processor(), template="idefics")
    path = _table(tmp_path, [{"image": "img/0.png", "caption": "<|endoftext|> starts it"}], "p.jsonl")
    _, (pair,) = _encode(path, "pairs", idefics)
    bos = idefics_tok.bos_token_id  # the same id as EOS here: one at each end, none from the caption
    assert pair.input_ids[0] == bos and pair.input_ids[-1] == bos and pair.input_ids.count(bos) == 2


def test_a_pairs_run_with_odd_records_goes_on(tmp_path, processor):
    """One source of each: the good pairs and the odd ones all give batches; the only skips are the fixture's."""
    data = make_pairs(str(tmp_path / "p"), 4)
    with open(data["path"], "a") as f:
        f.write(json.dumps({"image": "images/0.png", "caption": HALF_EMOJI}) + "\n")
        f.write(json.dumps({"image": "images/1.png", "caption": SPELLED}) + "\n")
    src = build_source(DatasetSection("p", "pairs", data["path"], 1, options={"shuffle": False}), processor)
    with pytest.warns(UserWarning, match="skipped"):
        assert len(list(src)) == 6
    assert src.skipped == data["bad"]
