"""The chat formats (flamingo/chat.py) where serving, training and `generate --chat` must agree: markers split over
text the format joins are refused, consecutive user turns and later system text are not glued to the text before
them, and a chat answer ends at the format's stop strings."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flamingo.chat import (
    FLAMINGO,
    MMGPT_PREAMBLE,
    OTTER,
    ChatFormat,
    IdeficsChat,
    MMGPTChat,
    Turn,
    chat_format_for,
    control_tokens,
)
from flamingo.cli import main
from flamingo.config import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo.data.chat import chat_example
from flamingo.data.sources import RawRecord, read_records
from flamingo.data.spec import DatasetSpec
from flamingo.processing import FlamingoProcessor
from flamingo.serve.protocol import APIError, ChatCompletionRequest, parse
from flamingo.serve.template import render_messages
from flamingo.tiny import random_image, tiny_flamingo

from helpers import tiny_otter_shaped


def _messages(*turns):
    return parse(ChatCompletionRequest, {"messages": list(turns)}).messages


def _mmgpt():
    model, processor = tiny_flamingo()
    return model, FlamingoProcessor(processor.tokenizer, processor.image_processor, template="mmgpt")


IMAGE = {"type": "image_url", "image_url": {"url": "a"}}


@pytest.mark.parametrize(
    "turns, token",
    [
        ([{"role": "user", "content": "hi <|endof"}, {"role": "user", "content": "chunk|> there"}], "<|endofchunk|>"),
        ([{"role": "system", "content": "be <|endof"}, {"role": "user", "content": "text|> there"}], "<|endoftext|>"),
        (
            [
                {"role": "user", "content": [IMAGE, {"type": "text", "text": "a <ima"}]},
                {"role": "user", "content": "ge> b"},
            ],
            "<image>",
        ),
    ],
)
def test_a_marker_split_over_messages_the_flamingo_format_joins_is_refused(turns, token):
    """The flamingo format writes consecutive system and user turns with nothing between them: a marker or control
    token split over two messages would be whole in the prompt, so it is refused as a whole one is."""
    control = control_tokens(tiny_flamingo()[1])
    with pytest.raises(APIError, match=r"messages\[1\]: text may not contain " + token.replace("|", r"\|")) as e:
        render_messages(FLAMINGO, _messages(*turns), control)
    assert e.value.status == 400
    # text between them (an answer's gap and end marker), or a format that separates the turns: plain text
    apart = [turns[0], {"role": "assistant", "content": "x"}, turns[1]]
    render_messages(FLAMINGO, _messages(*apart), control)
    render_messages(OTTER, _messages(*turns), control)


def test_a_split_marker_is_refused_only_where_the_format_writes_it_whole(tmp_path):
    """Two text parts of one message: the flamingo format writes them as they are (`a <|endof` `chunk|> b` is the
    marker: refused), Otter's puts a space between a turn's texts (`a <|endof chunk|> b`: text, served and trained
    alike)."""
    control = control_tokens(tiny_flamingo()[1])
    parts = [
        {
            "role": "user",
            "content": [IMAGE, {"type": "text", "text": "a <|endof"}, {"type": "text", "text": "chunk|> b"}],
        }
    ]
    with pytest.raises(APIError, match=r"messages\[0\]: text may not contain <\|endofchunk\|>"):
        render_messages(FLAMINGO, _messages(*parts), control)
    served = render_messages(OTTER, _messages(*parts), control)[0]
    assert served == "<image>User: a <|endof chunk|> b GPT:<answer>"
    _, processor = tiny_otter_shaped()
    row = {"messages": [*parts, {"role": "assistant", "content": "yes"}]}
    row["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": "0.png"}}
    random_image(0).save(tmp_path / "0.png")
    (tmp_path / "chat.jsonl").write_text(json.dumps(row) + "\n")
    spec = DatasetSpec.create("chat", "chat", str(tmp_path / "chat.jsonl"), 1, {}, processor)
    (record,) = read_records(str(tmp_path / "chat.jsonl"))
    assert spec.example(record).text.startswith(served)


def test_consecutive_user_turns_and_later_system_text_are_not_glued():
    """Otter and Multimodal-GPT ask one question per answer: consecutive user turns are one (an OpenAI client's image
    message, then its question), and a system message after the first turn starts a line (a paragraph) of its own."""
    user_user = _messages({"role": "user", "content": [IMAGE]}, {"role": "user", "content": "What is it?"})
    mid_system = _messages(
        {"role": "user", "content": "a"}, {"role": "system", "content": "S"}, {"role": "user", "content": "b"}
    )
    assert render_messages(OTTER, user_user)[0] == "<image>User: What is it? GPT:<answer>"
    assert (
        render_messages(OTTER, _messages({"role": "user", "content": "a"}, {"role": "user", "content": "b"}))[0]
        == "User: a b GPT:<answer>"
    )
    assert render_messages(OTTER, mid_system)[0] == "User: a\nS\nUser: b GPT:<answer>"
    mmgpt = chat_format_for(_mmgpt()[1])
    assert render_messages(mmgpt, user_user)[0] == (
        MMGPT_PREAMBLE + "\n\n### Image:\n<image>\n\n### Instruction:\nWhat is it?\n\n### Response:\n"
    )
    assert render_messages(mmgpt, mid_system)[0] == (
        MMGPT_PREAMBLE + "\n\n### Instruction:\na\n\nS\n\n### Instruction:\nb\n\n### Response:\n"
    )
    assert (
        mmgpt.render([Turn("system", ("X",)), Turn("system", ("Y",)), Turn("user", ("q",))])
        == "X\n\nY\n\n### Instruction:\nq\n\n### Response:\n"
    )


def test_chat_data_writes_consecutive_user_turns_as_served(tmp_path):
    """The same messages as a training row: the sample's text is the server's prompt and the answer."""
    _, processor = tiny_otter_shaped()
    random_image(0).save(tmp_path / "0.png")
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "0.png"}}]},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A cat."},
    ]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    spec = DatasetSpec.create("c", "chat", str(tmp_path / "c.jsonl"), 1, {}, processor)
    (sample,) = [spec.encode(r) for r in read_records(str(tmp_path / "c.jsonl"))]
    served, _ = render_messages(OTTER, _messages(*messages[:2]))
    assert (
        sample.text == served + " A cat.<|endofchunk|>" == "<image>User: What is it? GPT:<answer> A cat.<|endofchunk|>"
    )
    assert sample.input_ids[: len(processor.prompt_ids(served))] == processor.prompt_ids(served)


def _answer_generate(model, answer_ids, seen):
    """`model.generate` replaced by one that writes `answer_ids` (streamed, as transformers streams)."""

    def generate(input_ids, streamer=None, **kwargs):
        seen.update(kwargs)
        if streamer is not None:
            streamer.put(input_ids)
            for token in answer_ids:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([answer_ids])], dim=1)

    return generate


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_chat_ends_at_the_formats_stop_strings(beams, monkeypatch, capsys):
    """`flamingo generate --chat` cuts an answer where the server does (mmgpt's `### End.`), streamed or not, and
    stops generating there."""
    import flamingo.convert.auto as auto

    model, processor = _mmgpt()
    seen = {}
    answer = processor.tokenizer("red### End. And more words", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(model, "generate", _answer_generate(model, answer, seen))
    monkeypatch.setattr(auto, "load_model", lambda *args, **kwargs: (model, processor))
    assert main(["generate", "--model", "m", "--chat", "--prompt", "What colour?", "--num-beams", str(beams)]) == 0
    assert capsys.readouterr().out == "red\n"
    assert seen["stop_strings"] == list(chat_format_for(processor).stops)
    assert seen["tokenizer"] is processor.tokenizer


def test_generate_chat_with_stop_strings_runs_the_model(monkeypatch, capsys):
    """The stop strings go through `Flamingo.generate` to transformers' own stopping criteria."""
    import flamingo.convert.auto as auto

    model, processor = _mmgpt()
    monkeypatch.setattr(auto, "load_model", lambda *args, **kwargs: (model, processor))
    assert main(["generate", "--model", "m", "--chat", "--prompt", "What colour?", "--max-new-tokens", "4"]) == 0
    fmt = chat_format_for(processor)
    batch = processor(fmt.render([Turn("user", ("What colour?",))]))
    new = model.generate(**batch, max_new_tokens=4)[0, batch["input_ids"].shape[1] :]
    assert capsys.readouterr().out.strip() == fmt.cut(processor.decode(new, skip_special_tokens=True)).strip()


def _masked(turns):
    """`turns` with each text piece's non-blank characters one private-use character of its own (blanks kept, as the
    formats' decisions read them): the rendering of these shows which piece wrote each character."""
    out, n = [], 0
    for turn in turns:
        pieces = []
        for piece in turn.pieces:
            pieces.append(
                piece if piece == MEDIA_TOKEN else "".join(c if c.isspace() else chr(0xE000 + n) for c in piece)
            )
            n += piece != MEDIA_TOKEN
        out.append(Turn(turn.role, tuple(pieces)))
    return out


def _spelled_by_pieces(fmt, turns, strings):
    """The oracle: the first of `strings` some occurrence of which in the rendering is written by two pieces, or by a
    piece and the format (not by one piece, nor by the format alone); None if none ("" where masking changed the
    length, which no format here does for these pieces)."""
    text, masked = fmt.render(turns), fmt.render(_masked(turns))
    if len(text) != len(masked):
        return ""
    for s in strings:
        start = 0
        while (i := text.find(s, start)) >= 0:
            span = masked[i : i + len(s)]
            owners = {c for c in span if 0xE000 <= ord(c) < 0xF000}
            written = [c for c in span if not 0xE000 <= ord(c) < 0xF000 and not c.isspace()]
            if owners and (len(owners) > 1 or written):
                return s
            start = i + 1
    return None


def test_spelled_finds_exactly_the_strings_pieces_spell_together_in_the_rendering_it_is_given():
    """`spelled` on random conversations of marker fragments, blanks and media, given the rendering the caller sends
    (`render`, or chat data's `prompt_of` its segments: the same text), against where each character came from."""
    eos = "</s>"
    formats = [
        FLAMINGO,
        OTTER,
        MMGPTChat(end_of_answer=eos, reserved=(MEDIA_TOKEN, END_OF_CHUNK_TOKEN, eos)),
        MMGPTChat(),
        IdeficsChat(),
        IdeficsChat(end_of_turn=""),
    ]
    rng = random.Random(0)
    spelled = 0
    for fmt in formats:
        strings = (*fmt.reserved, END_OF_CHUNK_TOKEN, "<|endoftext|>", "<image0>")
        fragments = ["a", "b ", " ", "\t", "\n", "x\n", "<", ">", "Q: "]
        fragments += [part for s in strings for i in range(1, len(s)) for part in (s[:i], s[i:])]
        for _ in range(500):
            turns = []
            for _ in range(rng.randint(1, 6)):
                role = rng.choice(["system", "user", "user", "assistant"])
                pieces = [rng.choice(fragments) for _ in range(rng.randint(1, 3))]
                if role == "user" and rng.random() < 0.3:
                    pieces.insert(rng.randint(0, len(pieces)), MEDIA_TOKEN)
                turns.append(Turn(role, tuple(pieces)))
            if rng.random() < 0.5 and turns[-1].role != "user":  # a request (else a training row)
                turns.append(Turn("user", ("q",)))
            if any(s in p for t in turns for p in t.pieces if p != MEDIA_TOKEN for s in strings):
                continue  # refused piece by piece before `spelled`
            rendered = fmt.render(turns)
            assert fmt.prompt_of(fmt.segments(turns)) == rendered
            got = fmt.spelled(turns, strings, rendered=rendered)
            want = _spelled_by_pieces(fmt, turns, strings)
            assert (got is None) == (want is None), (fmt.name, turns, rendered, got, want)
            if got is not None:
                spelled += 1
                first = got[0]  # the turn that completes it: the turns before it spell none, the turns to it do
                assert _spelled_by_pieces(fmt, turns[:first], strings) is None
                assert _spelled_by_pieces(fmt, turns[: first + 1], strings) is not None
    assert spelled > 50  # the conversations do spell markers


def test_a_request_and_a_training_row_render_their_conversation_once(monkeypatch, tmp_path):
    """The split-marker check reads the prompt the server sends (the text chat data trains on) rather than writing
    the conversation again: an 8 MB request pays for one rendering of its text."""
    written = []
    segments = ChatFormat.segments

    def counted(self, turns):
        written.append(any(p != MEDIA_TOKEN for t in turns for p in t.pieces))  # the text, not the format's own
        return segments(self, turns)

    monkeypatch.setattr(ChatFormat, "segments", counted)
    messages = [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And now?"},
    ]
    prompt, _ = render_messages(FLAMINGO, _messages(*messages), control_tokens(tiny_flamingo()[1]))
    assert prompt == "<image>What is it? A cat.<|endofchunk|>And now?" and written.count(True) == 1
    written.clear()
    random_image(0).save(tmp_path / "0.png")
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "0.png"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."},
        ]
    }
    example = chat_example(RawRecord("k", str(tmp_path / "c.jsonl"), row), FLAMINGO)
    assert example.text == "<image>What is it? A cat.<|endofchunk|>" and written.count(True) == 1
