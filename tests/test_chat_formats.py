"""The chat formats (flamingo/chat.py) where serving, training and `generate --chat` must agree: markers split over
text the format joins are refused, consecutive user turns and later system text are not glued to the text before
them, and a chat answer ends at the format's stop strings."""

from __future__ import annotations

import json

import pytest
import torch

from flamingo.chat import FLAMINGO, MMGPT_PREAMBLE, OTTER, Turn, chat_format_for
from flamingo.cli import main
from flamingo.data.sources import read_records
from flamingo.data.spec import DatasetSpec
from flamingo.processing import FlamingoProcessor
from flamingo.serve.protocol import APIError, ChatCompletionRequest, parse
from flamingo.serve.template import control_tokens, render_messages
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
    parts = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "a <|endof"},
                                          {"type": "text", "text": "chunk|> b"}]}]
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
