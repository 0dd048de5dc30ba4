"""Conversation data (visual instruction tuning, docs/data.md "Conversations"): LLaVA's `conversations` and OpenAI
`messages` give the same sample, written in the model's chat format exactly as `flamingo serve` writes it, with labels
on the answers (and their end markers) only; malformed conversations are skipped and counted; a tiny model trains on
them."""

from __future__ import annotations

import json
import re
import tarfile
import warnings

import pytest
import torch

from flamingo.chat import Turn, chat_format_for
from flamingo.cli import main
from flamingo.config import END_OF_CHUNK_TOKEN, END_OF_UTTERANCE, IDEFICS_IMAGE_WRAPPER
from flamingo.data import build_source
from flamingo.data.errors import SkipSample
from flamingo.data.inspect import detect_kind, inspect_dataset
from flamingo.data.sequence import IGNORE_INDEX
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec
from flamingo.processing import FlamingoProcessor
from flamingo.tiny import random_image, tiny_flamingo, tiny_image_processor, tiny_tokenizer
from flamingo.train.config import DatasetSection

from helpers import tiny_otter_shaped

QUESTIONS = ["What is in the image?", "And its colour?"]
ANSWERS = ["A square next to a circle.", "Red."]
END = {"flamingo": END_OF_CHUNK_TOKEN, "otter": END_OF_CHUNK_TOKEN, "idefics": END_OF_UTTERANCE}


def _processor(template: str) -> FlamingoProcessor:
    if template == "idefics":
        tok = tiny_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": [IDEFICS_IMAGE_WRAPPER, "<image>", END_OF_UTTERANCE]})
        tok.pad_token = tok.eos_token
        return FlamingoProcessor(tok, tiny_image_processor(), template="idefics")
    return (tiny_otter_shaped() if template == "otter" else tiny_flamingo())[1]


def _write(tmp_path, rows, name="chat.jsonl"):
    (tmp_path / "img").mkdir(exist_ok=True)
    for k in range(3):
        random_image(k).save(tmp_path / "img" / f"{k}.png")
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


LLAVA = {"image": "img/0.png", "conversations": [
    {"from": "human", "value": "<image>\n" + QUESTIONS[0]}, {"from": "gpt", "value": ANSWERS[0]},
    {"from": "human", "value": QUESTIONS[1]}, {"from": "gpt", "value": ANSWERS[1]}]}
MESSAGES = {"messages": [
    {"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                 {"type": "text", "text": "\n" + QUESTIONS[0]}]},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": QUESTIONS[1]},
    {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[1]}]}]}


def _encode(path, processor, **options):
    spec = DatasetSpec.create("chat", "chat", path, 1, options, processor)
    return [spec.encode(record) for record in read_records(path)]


def _runs(labels):
    """The contiguous runs of labelled tokens."""
    runs, run = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(label)
    return runs


@pytest.mark.parametrize("template", ["flamingo", "otter", "idefics"])
def test_llava_and_openai_records_give_one_sample_labelled_on_its_answers(tmp_path, template):
    processor = _processor(template)
    llava, messages = _encode(_write(tmp_path, [LLAVA, MESSAGES]), processor)
    assert (llava.input_ids, llava.labels) == (messages.input_ids, messages.labels)
    assert torch.equal(llava.media[0], messages.media[0]) and len(llava.media) == 1
    runs = [processor.tokenizer.decode(run).strip() for run in _runs(llava.labels)]
    assert runs == [a + END[template] for a in ANSWERS]
    # what the server writes for the conversation up to the second question is this sample's beginning
    fmt = chat_format_for(processor)
    served = fmt.render([Turn("user", ("<image>", "\n" + QUESTIONS[0])), Turn("assistant", (ANSWERS[0],)),
                         Turn("user", (QUESTIONS[1],))])
    assert llava.text.startswith(served) and llava.text == served + " " + ANSWERS[1] + END[template] + \
        ("\n" if template == "idefics" else "")
    served_ids = processor.prompt_ids(served)
    assert llava.input_ids[:len(served_ids)] == served_ids
    if template == "idefics":  # its template's BOS and image wrappers, as served
        assert llava.input_ids[0] == processor.tokenizer.bos_token_id
        assert processor.tokenizer.convert_tokens_to_ids(IDEFICS_IMAGE_WRAPPER) in llava.input_ids


def test_placement_trailing_turns_eos_and_truncation(tmp_path):
    processor = _processor("flamingo")
    two = {"image": ["img/1.png", "img/2.png"], "conversations": [
        {"from": "system", "value": "Be brief. "}, {"from": "human", "value": "Compare:"},
        {"from": "gpt", "value": "Same."}, {"from": "human", "value": "and?"}]}  # no placeholders: the images open
    # the first human turn
    path = _write(tmp_path, [two])
    (sample,) = _encode(path, processor)
    assert sample.text == "Be brief. <image><image>Compare: Same.<|endofchunk|>"  # the unanswered turn is dropped
    assert len(sample.media) == 2
    (with_eos,) = _encode(path, processor, append_eos=True)
    assert with_eos.text.endswith("<|endofchunk|><|endoftext|>") and with_eos.labels[-1] == with_eos.input_ids[-1]
    (full,) = _encode(_write(tmp_path, [LLAVA]), processor)
    cut = len(full.input_ids) - 3  # inside the second answer
    (short,) = _encode(_write(tmp_path, [LLAVA]), processor, max_tokens=cut)
    assert short.input_ids == full.input_ids[:cut] and short.labels == full.labels[:cut]
    first_answer = next(t for t, label in enumerate(full.labels) if label != IGNORE_INDEX)
    with pytest.raises(SkipSample, match="no answer token") as e:  # cut before any answer: nothing to learn
        _encode(_write(tmp_path, [LLAVA]), processor, max_tokens=first_answer)
    assert e.value.reason == "empty_text"


@pytest.mark.parametrize("row, reason, detail", [
    ({"image": "img/0.png", "conversations": [{"from": "human", "value": "<image>hi"}]}, "empty_text",
     "no assistant answer"),
    ({"image": "img/0.png", "conversations": [{"from": "human", "value": "a <|endofchunk|> b"},
                                              {"from": "gpt", "value": "x"}]}, "bad_record", "marker"),
    ({"image": "img/0.png", "conversations": [{"from": "human", "value": "<image><image>hi"},
                                              {"from": "gpt", "value": "x"}]}, "bad_record", "placeholders"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image", "image": "img/0.png"}]}]}, "bad_record", "only user turns"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "bad_record", "role"),
    ({"image": "img/0.png", "conversations": [{"from": ["human"], "value": "<image>hi"},
                                              {"from": "gpt", "value": "x"}]}, "bad_record", "needs 'from'"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "bad_record", "part type"),
    ({"image": "img/0.png", "caption": "a pair"}, "bad_record", "no 'messages' or 'conversations'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/9.png"}}]},
                   {"role": "assistant", "content": "x"}]}, "missing_file", "9.png"),
    # a marker split over text the format writes with nothing between: two text parts, a system and a human turn
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                {"type": "text", "text": "a <ima"}, {"type": "text", "text": "ge> b"}]},
                   {"role": "assistant", "content": "x"}]}, "bad_record", "spells <image>"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                {"type": "text", "text": "a <|endof"},
                                                {"type": "text", "text": "chunk|> b"}]},
                   {"role": "assistant", "content": "x"}]}, "bad_record", "spells <|endofchunk|>"),
    ({"image": "img/0.png", "conversations": [{"from": "system", "value": "sys <|endof"},
                                              {"from": "human", "value": "chunk|><image> q"},
                                              {"from": "gpt", "value": "x"}]}, "bad_record", "turn 1 spells"),
])
def test_bad_conversations_are_skipped_with_their_reason(tmp_path, row, reason, detail):
    processor = _processor("flamingo")
    with pytest.raises(SkipSample, match=detail) as e:
        _encode(_write(tmp_path, [row]), processor)
    assert e.value.reason == reason


def test_kind_detection_inspection_and_tar_shards(tmp_path):
    path = _write(tmp_path, [LLAVA, MESSAGES, {"messages": [{"role": "user", "content": "no answer"}]}])
    assert detect_kind(path) == "chat"
    report = inspect_dataset(path, processor=_processor("flamingo"))
    assert (report.kind, report.samples, report.media, report.skipped) == ("chat", 2, 2, {"empty_text": 1})
    shard = tmp_path / "chat-000.tar"
    with tarfile.open(shard, "w") as tar:  # WebDataset layout: the conversation and its image member
        (tmp_path / "s.json").write_text(json.dumps(LLAVA))  # its `image` the original path, no member's name
        tar.add(tmp_path / "s.json", "s0.json")
        tar.add(tmp_path / "img" / "0.png", "s0.png")
    assert detect_kind(str(shard)) == "chat"
    processor = _processor("flamingo")
    (from_tar,) = _encode(str(shard), processor)
    (from_table,) = _encode(_write(tmp_path, [LLAVA]), processor)
    assert from_tar.input_ids == from_table.input_ids and torch.equal(from_tar.media[0], from_table.media[0])
    # `flamingo data pack --kind chat`: several media per conversation, as members the JSON names
    two = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/1.png"},
                                                     {"type": "text", "text": "And"},
                                                     {"type": "image_url", "image_url": {"url": "img/2.png"}}]},
                        {"role": "assistant", "content": "Two."}]}
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    table = _write(tmp_path, [LLAVA, two, {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "img/7.png"}]}, {"role": "assistant", "content": "x"}]}, text_only], "pack.jsonl")
    assert main(["data", "pack", "--from", table, "--kind", "chat", "--out", str(tmp_path / "packed")]) == 0
    shard = str(tmp_path / "packed" / "shard-000000.tar")
    records = list(read_records(shard))  # the third row's image is missing: left out of the shard (and counted)
    spec = DatasetSpec.create("chat", "chat", shard, 1, {}, processor)
    packed = [spec.encode(record) for record in records[:2]]
    tables = [_encode(_write(tmp_path, [row], "one.jsonl"), processor)[0] for row in (LLAVA, two)]
    # A text conversation reads back as one, with no media member to look for; like its table row, it is then
    # skipped for having no image (Flamingo's samples have one), not for a missing file.
    for source in (records[2], next(iter(read_records(_write(tmp_path, [text_only], "text.jsonl"))))):
        with pytest.raises(SkipSample) as skipped:
            spec.encode(source)
        assert skipped.value.reason == "no_matched_image"
    assert [s.input_ids for s in packed] == [s.input_ids for s in tables]
    assert all(torch.equal(a, b) for s, t in zip(packed, tables) for a, b in zip(s.media, t.media))
    assert len(packed[1].media) == 2


def test_a_tar_sample_lends_its_own_image_only_to_a_record_naming_one(tmp_path):
    """The sample's own image member stands in for a path that names no member only when the record names one
    medium: two named images are two images, and two paths that are no members are `missing_file`, not one image
    twice."""
    two = {"image": ["coco/a.jpg", "coco/b.jpg"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nAre these the same?"}, {"from": "gpt", "value": "No."}]}
    two_messages = {"messages": [{"role": "user", "content": [{"type": "image", "image": "coco/a.jpg"},
                                                              {"type": "image", "image": "coco/b.jpg"}]},
                                 {"role": "assistant", "content": "No."}]}
    one = dict(LLAVA, image="coco/a.jpg")  # a path from the original dataset: the member stands in
    _write(tmp_path, [])
    shard = tmp_path / "chat-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, row in enumerate([two, two_messages, one]):
            (tmp_path / "s.json").write_text(json.dumps(row))
            tar.add(tmp_path / "s.json", f"s{key}.json")
            tar.add(tmp_path / "img" / "0.png", f"s{key}.png")
    spec = DatasetSpec.create("chat", "chat", str(shard), 1, {}, _processor("flamingo"))
    records = list(read_records(str(shard), "json"))
    for record in records[:2]:
        with pytest.raises(SkipSample, match="names 2 media") as e:
            spec.example(record)
        assert e.value.reason == "missing_file"
    assert [m.name.rsplit(":", 1)[1] for m in spec.example(records[2]).media] == ["s2.png"]


def _inline(path, mime="image/png"):
    import base64

    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_inline_data_url_media_train_as_their_files_and_remote_urls_are_not_fetched(tmp_path):
    """OpenAI's fine-tuning rows carry images as `data:` URLs: such a medium is the file it encodes, in a table and
    in a packed shard (kept inline in the JSON); a malformed one is `bad_record`; an https URL is `missing_file`,
    saying it is never fetched."""
    processor = _processor("flamingo")
    _write(tmp_path, [])
    inline = json.loads(json.dumps(MESSAGES))
    inline["messages"][0]["content"][0] = {"type": "image_url",
                                           "image_url": {"url": _inline(tmp_path / "img" / "0.png")}}
    (from_file,), (from_url,) = _encode(_write(tmp_path, [MESSAGES], "a.jsonl"), processor), \
        _encode(_write(tmp_path, [inline], "b.jsonl"), processor)
    assert from_url.input_ids == from_file.input_ids and from_url.labels == from_file.labels
    assert torch.equal(from_url.media[0], from_file.media[0])
    assert main(["data", "pack", "--from", _write(tmp_path, [inline], "c.jsonl"), "--kind", "chat",
                 "--out", str(tmp_path / "packed")]) == 0
    (record,) = read_records(str(tmp_path / "packed" / "shard-000000.tar"))
    (packed,) = [DatasetSpec.create("chat", "chat", str(tmp_path / "packed"), 1, {}, processor).encode(record)]
    assert packed.input_ids == from_file.input_ids and torch.equal(packed.media[0], from_file.media[0])
    for url, reason, detail in (("data:image/png;base64,%%%", "bad_record", "base64 does not decode"),
                                ("data:text/plain;base64,aGk=", "bad_record", "unsupported media type"),
                                ("https://example.com/cat.png", "missing_file", "never the network"),
                                # a host urlsplit refuses (ValueError) is still a counted skip, not a failed run
                                ("http://[broken/x.jpg", "missing_file", "never the network"),
                                ("//[abc]/x.jpg", "missing_file", "")):
        bad = json.loads(json.dumps(inline))
        bad["messages"][0]["content"][0]["image_url"]["url"] = url
        with pytest.raises(SkipSample, match=detail) as e:
            _encode(_write(tmp_path, [bad], "bad.jsonl"), processor)
        assert e.value.reason == reason


def test_endofchunk_in_a_conversation_is_refused_in_every_format(tmp_path):
    """`<|endofchunk|>` in message text is Flamingo's marker: refused in IDEFICS's format too, whose tokenizer would
    train its characters."""
    row = {"image": "img/0.png", "conversations": [{"from": "human", "value": "<image>a <|endofchunk|> b"},
                                                   {"from": "gpt", "value": "x"}]}
    with pytest.raises(SkipSample, match="chunk marker") as e:
        _encode(_write(tmp_path, [row]), _processor("idefics"))
    assert e.value.reason == "bad_record"


def test_a_question_names_an_image_the_conversation_has_shown(tmp_path):
    """On a model with reference tokens a user's `<imagek>` is the reference token where image k was shown before it
    (MMICL-style conversations); a row naming an image not shown at that point is skipped (`bad_record`, naming the
    tag and the images shown), as the server refuses that message. An assistant turn's references are trained as
    written (the model may generate them)."""
    processor = tiny_flamingo(num_image_references=4)[1]
    tok = processor.tokenizer
    image = [{"type": "image", "image": f"img/{k}.png"} for k in range(2)]
    good = {"messages": [{"role": "user", "content": [*image, {"type": "text", "text": "Which is <image1>?"}]},
                         {"role": "assistant", "content": "The one like <image0>."}]}
    (sample,) = _encode(_write(tmp_path, [good]), processor)
    first, second = tok.convert_tokens_to_ids("<image0>"), tok.convert_tokens_to_ids("<image1>")
    assert sample.labels[sample.input_ids.index(second)] == IGNORE_INDEX  # the question's reference: context
    assert sample.labels[sample.input_ids.index(first)] == first  # the answer's: trained
    unshown = {"messages": [{"role": "user", "content": [image[0], {"type": "text", "text": "See <image2>."}]},
                            {"role": "assistant", "content": "Yes <image2>."}]}
    before = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Is <image0> red?"}, image[0]]},
                           {"role": "assistant", "content": "x"}]}
    llava = {"image": "img/0.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt",
             "value": "x"}, {"from": "human", "value": "and <image1>?"}, {"from": "gpt", "value": "y"}]}
    split = {"messages": [{"role": "user", "content": [image[0], {"type": "text", "text": "Is <ima"},
                                                       {"type": "text", "text": "ge0> red?"}]},
                          {"role": "assistant", "content": "x"}]}  # refused as the server refuses it
    for row, says in ((unshown, "turn 0: <image2> refers to image 2, but the conversation shows only image 0 before"),
                      (before, "turn 0: <image0> refers to image 0, but the conversation shows no image before it"),
                      (llava, "turn 2: <image1> refers to image 1"),
                      (split, "turn 0 spells <image0>, a reference token")):
        with pytest.raises(SkipSample, match=re.escape(says)) as e:
            _encode(_write(tmp_path, [row]), processor)
        assert e.value.reason == "bad_record"
    assistant = {"messages": [{"role": "user", "content": [image[0], {"type": "text", "text": "q"}]},
                              {"role": "assistant", "content": "like <image3>"}]}
    (kept,) = _encode(_write(tmp_path, [assistant]), processor)
    assert tok.convert_tokens_to_ids("<image3>") in kept.input_ids


def test_a_model_learns_the_answers_of_a_chat_dataset(tmp_path):
    """The batches train: the loss is over the answers' tokens only, and a few steps on the blocks lower it."""
    model, processor = tiny_flamingo(gates=0.5)
    path = _write(tmp_path, [LLAVA, MESSAGES] * 4)
    source = build_source(DatasetSection("chat", "chat", path, batch_size=4, options={"shuffle": False}), processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(source)
    assert len(batches) == 2
    batch = {k: v for k, v in batches[0].items() if k != "keys"}
    for labels in batch["labels"]:  # the questions are not trained: the answers (with their gaps) are
        trained = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert trained == "".join(" " + answer + END_OF_CHUNK_TOKEN for answer in ANSWERS)
    with torch.no_grad():  # the loss is the mean next-token loss over the answers' tokens
        out = model(**batch)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)
    trained = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trained, lr=1e-2)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(**batch).loss
        losses.append(loss.item())
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert losses[-1] < losses[0] - 0.1, losses


def test_pairs_for_an_idefics_model_are_written_as_it_is_served(tmp_path):
    """Every kind is tokenized in the processor's template: a converted IDEFICS model trains on BOS and wrapped
    images, as it is prompted; the wrappers, like `<image>`, are never targets. Its tokenizer has no
    `<|endofchunk|>`: the caption ends with EOS alone, as IDEFICS trains pairs."""
    processor = _processor("idefics")
    path = tmp_path / "pairs.jsonl"
    _write(tmp_path, [])
    path.write_text(json.dumps({"image": "img/0.png", "caption": "a red square."}) + "\n")
    spec = DatasetSpec.create("p", "pairs", str(path), 1, None, processor)
    (sample,) = [spec.encode(record) for record in read_records(str(path))]
    assert sample.input_ids == processor.prompt_ids("<image>a red square." + spec.eos)
    wrapper = processor.tokenizer.convert_tokens_to_ids(IDEFICS_IMAGE_WRAPPER)
    assert sample.input_ids[:4] == [processor.tokenizer.bos_token_id, wrapper, processor.media_token_id, wrapper]
    assert sample.labels[:4] == [IGNORE_INDEX] * 4 and sample.labels[4] == sample.input_ids[4]


TEXT_ONLY = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]}


def test_text_only_conversations_are_kept_when_asked_and_train(tmp_path):
    """`text_only: true` keeps conversations without media (language-only instruction data), labelled on their
    answers; by default they are skipped and counted. A batch mixing them with image conversations trains: with
    `imageless_rows_skip_blocks` (Multimodal-GPT's rule) a text-only batch moves the LM's adapters and no block,
    under Flamingo's rule it moves the blocks' dense layers too."""
    processor = tiny_flamingo()[1]
    path = _write(tmp_path, [LLAVA, TEXT_ONLY])
    with pytest.raises(SkipSample, match="no <image>"):
        _encode(_write(tmp_path, [TEXT_ONLY], "t.jsonl"), processor)
    image, text = _encode(path, processor, text_only=True)
    assert len(image.media) == 1 and text.media == []
    assert [processor.tokenizer.decode(r).strip() for r in _runs(text.labels)] == ["Blue.<|endofchunk|>"]
    late = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                         {"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                      {"type": "text", "text": "And here?"}]},
                         {"role": "assistant", "content": "Red."}]}
    cut = _write(tmp_path, [late], "cut.jsonl")  # a conversation whose image the truncation cuts: still skipped
    whole = _encode(cut, processor, text_only=True)[0].input_ids
    with pytest.raises(SkipSample, match="no <image>"):
        _encode(cut, processor, text_only=True, max_tokens=whole.index(processor.media_token_id))

    for skip, moves_blocks in ((True, False), (False, True)):
        model, processor = tiny_flamingo(gates=0.5, lm_lora={"r": 2}, imageless_rows_skip_blocks=skip)
        only_text = _write(tmp_path, [TEXT_ONLY] * 2, "only.jsonl")
        source = build_source(DatasetSection("c", "chat", only_text, batch_size=2,
                                             options={"shuffle": False, "text_only": True}), processor)
        batch = {k: v for k, v in next(iter(source)).items() if k != "keys"}
        assert batch["images"] is None
        model.train()
        model(**batch).loss.backward()
        lora = [p.grad for n, p in model.named_parameters() if ".lora_B" in n]
        blocks = [p.grad for p in model.xattn.parameters() if p.requires_grad]
        assert all(g is not None and g.abs().sum() > 0 for g in lora)
        assert any(g is not None and g.abs().sum() > 0 for g in blocks) == moves_blocks


def test_text_only_micro_batches(tmp_path):
    """A micro-batch of text-only rows (its slice of `images` all padding) runs as a batch without images, the tower
    never called on zero frames (under FSDP: tests/test_train.py)."""
    import yaml

    from flamingo.train.config import load_config
    from flamingo.train.trainer import Trainer

    model, processor = tiny_flamingo(gates=0.5)
    batch = processor(["<image>A photo.", "Some text."], images=[[random_image(0)], []])
    with torch.no_grad():
        alone = model(**processor("Some text.")).logits
        second = model(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:],
                       images=batch["images"][1:], num_media=batch["num_media"][1:]).logits
    n = int(batch["attention_mask"][1].sum())
    assert torch.allclose(second[0, -n:], alone[0], atol=1e-5)

    path = _write(tmp_path, [TEXT_ONLY, TEXT_ONLY, LLAVA, LLAVA], "mixed.jsonl")
    config = {"model": {"vision": "unused", "lm": "unused"},
              "data": [{"name": "c", "kind": "chat", "path": path, "batch_size": 4,
                        "options": {"shuffle": False, "text_only": True}}],
              "train": {"steps": 1, "micro_batches": 2, "output_dir": str(tmp_path / "run"), "save_every": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    loaded = load_config(str(tmp_path / "c.yaml"))
    trainer = Trainer(loaded, model=model, processor=processor)
    assert trainer.train_step()["loss"] > 0


def test_a_question_ending_in_a_space_is_trained_as_it_is_served(tmp_path):
    """Flamingo's format leaves a question's trailing spaces to the answer's gap: the sample's tokens before the
    answer are the served prompt's, and the answer's first token is the one that follows it (` a`, not a lone space
    and then `a`)."""
    processor = _processor("flamingo")
    fmt = chat_format_for(processor)
    for question in ("Output: ", "Output:"):
        row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                         {"type": "text", "text": question}]},
                            {"role": "assistant", "content": "a cat."}]}
        (sample,) = _encode(_write(tmp_path, [row]), processor)
        served = fmt.render([Turn("user", ("<image>", question))])
        assert served == "<image>Output:" and sample.text == served + " a cat.<|endofchunk|>"
        served_ids = processor.prompt_ids(served)
        assert sample.input_ids[:len(served_ids)] == served_ids
        assert sample.labels[len(served_ids)] == sample.input_ids[len(served_ids)] != IGNORE_INDEX


def test_mmgpt_append_eos_trains_its_answers_end_once(tmp_path):
    """Multimodal-GPT's answers end with EOS: `append_eos` adds none after the last (a second teaches nothing), and
    the last answer's EOS stays the token, never its characters trained as text."""
    tiny = _processor("flamingo")
    processor = FlamingoProcessor(tiny.tokenizer, tiny.image_processor, template="mmgpt")
    eos = processor.tokenizer.eos_token_id
    path = _write(tmp_path, [LLAVA])
    plain, (with_eos,) = _encode(path, processor)[0], _encode(path, processor, append_eos=True)
    assert with_eos.input_ids == plain.input_ids and with_eos.labels == plain.labels
    assert with_eos.input_ids.count(eos) == len(ANSWERS) and with_eos.input_ids[-1] == eos
    runs = [processor.tokenizer.decode(run) for run in _runs(with_eos.labels)]
    assert runs == [a + processor.tokenizer.eos_token for a in ANSWERS]


def test_video_placeholders_and_the_developer_role_read_as_served(tmp_path):
    """A LLaVA-format video row (Video-LLaVA, Video-ChatGPT) marks its video with `<video>`: the medium's
    placeholder, never trained as text; a `developer` message is a system message, as the server reads it."""
    spec = DatasetSpec.create("chat", "chat", _write(tmp_path, []), 1, {}, _processor("flamingo"))

    def example(row):
        path = _write(tmp_path, [row], "one.jsonl")
        (record,) = read_records(path)
        return spec.example(record)

    video = example({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                         {"from": "gpt", "value": "A ball rolls."}]})
    assert video.text == "<image>\nWhat happens? A ball rolls.<|endofchunk|>" and len(video.media) == 1
    with pytest.raises(SkipSample, match="<image> or <video> placeholders") as e:
        example({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video><video>Q"},
                                                     {"from": "gpt", "value": "A."}]})
    assert e.value.reason == "bad_record"
    still = example({"image": "img/0.png", "conversations": [{"from": "human", "value": "<image>A <video> tag?"},
                                                              {"from": "gpt", "value": "Yes."}]})
    assert still.text == "<image>A <video> tag? Yes.<|endofchunk|>"  # an image row's text is its text
    rows = [{"messages": [{"role": role, "content": "Be brief."},
                          {"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                       {"type": "text", "text": "Q"}]},
                          {"role": "assistant", "content": "A"}]} for role in ("developer", "system")]
    developer, system = example(rows[0]), example(rows[1])
    assert developer.text == system.text == "Be brief.<image>Q A<|endofchunk|>"
