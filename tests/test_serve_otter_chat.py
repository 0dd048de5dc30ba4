"""Chat with an Otter model in its own instruction format (docs/serve.md, "The template"): OpenAI messages become the
prompt Otter's in-context demo writes, `<image>User: {q} GPT:<answer> {a}<|endofchunk|>...`, and the served answer is
the model's greedy answer to it, stopping at `<|endofchunk|>`."""

from __future__ import annotations

import httpx
import pytest

from flamingo.chat import BLANKS, FLAMINGO, OTTER, chat_format_for
from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Engine
from flamingo.serve.protocol import APIError, ChatCompletionRequest, parse
from flamingo.serve.template import render_messages
from flamingo.tiny import random_image

from helpers import tiny_otter_shaped
from serve_helpers import data_url, greedy_alone, openai_client, running_server

# Otter's in-context demo (pipeline/demo/otter_image_incontext.py): one example, then the question
DEMO = "<image>User: What does the image describe? GPT:<answer> A family is taking picture in front of a snow " \
       "mountain.<|endofchunk|><image>User: What is in this one? GPT:<answer>"


def _messages(*turns):
    return parse(ChatCompletionRequest, {"messages": list(turns)}).messages


def _demo_turns(first="a", second="b"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}},
                                         {"type": "text", "text": "What does the image describe?"}]},
            {"role": "assistant", "content": "A family is taking picture in front of a snow mountain."},
            {"role": "user", "content": [{"type": "text", "text": "What is in this one?"},
                                         {"type": "image_url", "image_url": {"url": second}}]}]


def test_the_in_context_demo_format():
    text, media = render_messages(OTTER, _messages(*_demo_turns()))
    assert text == DEMO and [m.url for m in media] == ["a", "b"]
    text, _ = render_messages(OTTER, _messages({"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}))
    assert text == "Be brief.\nUser: Hi GPT:<answer>"
    for marker in ("<answer>", "<|endofchunk|>", "<image>"):
        with pytest.raises(APIError, match="may not contain"):
            render_messages(OTTER, _messages({"role": "user", "content": f"a {marker} b"}))
    render_messages(FLAMINGO, _messages({"role": "user", "content": "a <answer> b"}))  # plain text to a Flamingo model


def test_otter_tokens_are_added_rows_in_otters_order():
    _, processor = tiny_otter_shaped()
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>", "<answer>", "<PAD>")]
    assert ids == list(range(len(tok) - 4, len(tok)))  # Otter's add_special_tokens calls give these ids
    assert chat_format_for(processor, len(tok)) is OTTER


def test_served_otter_chat_is_its_greedy_answer(one_thread):
    model, processor = tiny_otter_shaped()
    images = [random_image(3), random_image(4)]
    engine = Engine(model, processor, max_batch=4)
    with running_server(engine, ServeSettings(model_name="otter")) as url:
        assert httpx.get(url + "/v1/models/otter").json()["chat_template"] == "otter"
        turns = _demo_turns(data_url(images[0]), data_url(images[1]))
        out = openai_client(url).chat.completions.create(model="otter", messages=turns, max_tokens=10, temperature=0)
    tokens = greedy_alone(engine, DEMO, images, 10)
    eoc = processor.tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    stopped = bool(tokens) and tokens[-1] == eoc
    assert out.choices[0].message.content == processor.decode(tokens[:-1] if stopped else tokens).lstrip(BLANKS)
    assert out.usage.completion_tokens == len(tokens)
    assert out.usage.prompt_tokens == processor(DEMO, images=images)["input_ids"].shape[1]


def test_generate_chat_writes_the_question_in_the_models_format(tmp_path, capsys):
    """`flamingo generate --chat`: the question and images as one user turn of the model's format (here Otter's)."""
    from flamingo.build import load_pretrained
    from flamingo.cli import main

    model, processor = tiny_otter_shaped()
    model.save_pretrained(str(tmp_path / "model"), processor=processor)
    card = (tmp_path / "model" / "README.md").read_text()  # its example prompt is in the model's format
    assert 'prompt = "<image>User: What is in the picture? GPT:<answer>"' in card and "otter format" in card
    random_image(5).save(tmp_path / "a.png")
    args = ["generate", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "a.png"), "--max-new-tokens",
            "6", "--chat", "--prompt"]
    assert main(args + ["What is in this one?"]) == 0
    model, processor = load_pretrained(str(tmp_path / "model"))
    batch = processor("<image>User: What is in this one? GPT:<answer>", images=[str(tmp_path / "a.png")])
    expected = model.generate(**batch, max_new_tokens=6)[0, batch["input_ids"].shape[1]:]
    assert capsys.readouterr().out.rstrip("\n") == processor.decode(expected)  # (its bytes include whitespace)
    assert main(args + ["<image>What?"]) == 2
    assert "may not contain <image>" in capsys.readouterr().err


def test_formats_that_put_images_first_keep_a_space_where_an_image_was():
    """An OpenAI message [text "What is", image, text "this?"] in Otter's and Multimodal-GPT's formats (which put a
    turn's images first) read "What isthis?"."""
    from flamingo.chat import MMGPTChat, Turn

    for fmt in (OTTER, MMGPTChat()):
        for pieces in (("What is", "<image>", "this?"), ("What is ", "<image>", " this?")):
            rendered = fmt.render([Turn("user", pieces)])
            assert "What is this?" in rendered, (fmt.name, rendered)
