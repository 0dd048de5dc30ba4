"""The chat template (docs/serve.md): messages -> one Flamingo prompt and its media, in order."""

from __future__ import annotations

import pytest

from flamingo.chat import FLAMINGO
from flamingo.serve.protocol import APIError, ChatCompletionRequest, parse
from flamingo.serve.template import render_messages


def _messages(*turns):
    return parse(ChatCompletionRequest, {"messages": list(turns)}).messages


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_few_shot_conversation_is_the_flamingo_prompt():
    text, media = render_messages(FLAMINGO, _messages(
        {"role": "system", "content": "Answer briefly.\n"},
        {"role": "user", "content": [_image("a"), {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": "a cat."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, _image("b"),
                                     {"type": "video_url", "video_url": {"url": "c"}}, {"type": "text",
                                                                                        "text": "Output:"}]},
    ))
    assert text == "Answer briefly.\n<image>Output: a cat.<|endofchunk|>Compare <image><image>Output:"
    assert [(m.url, m.video) for m in media] == [("a", False), ("b", False), ("c", True)]


def test_no_space_is_added_where_there_is_one():
    text, _ = render_messages(FLAMINGO, _messages(
        {"role": "user", "content": "Q: "}, {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Q:"},
        {"role": "assistant", "content": " no"}, {"role": "user", "content": "Q:"}))
    assert text == "Q: yes<|endofchunk|>Q: no<|endofchunk|>Q:"


@pytest.mark.parametrize("turns, message", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
    ([{"role": "user", "content": "an <image> here"}], "may not contain <image>"),
    ([{"role": "user", "content": "<|endofchunk|>"}], "may not contain <|endofchunk|>"),
    ([{"role": "assistant", "content": [_image("a")]}, {"role": "user", "content": "q"}], "text only"),
    ([{"role": "system", "content": [_image("a")]}, {"role": "user", "content": "q"}], "text only"),
    # an answer that spelled a marker as text, sent back: the error says what to do about that answer
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "write <image> here"},
      {"role": "user", "content": "q"}], r"messages\[1\]: this assistant turn spells <image>.*drop that answer"),
])
def test_conversations_the_template_refuses(turns, message):
    with pytest.raises(APIError, match=message.replace("|", r"\|")):
        render_messages(FLAMINGO, _messages(*turns))
