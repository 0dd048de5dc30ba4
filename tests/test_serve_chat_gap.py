"""A chat answer's leading blanks: every format but mmgpt writes a space between the prompt and an answer (the gap), so
a model's answer starts with it; the server and `flamingo generate --chat` leave out the spaces and tabs an answer
starts with (`chat.BLANKS`), and nothing else: a line break or a control character the model writes first is the
answer's. The same greedy tokens give the same text both ways."""

from __future__ import annotations

import pytest
import torch

from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Engine
from flamingo.tiny import random_image, tiny_flamingo

from helpers import tiny_otter_shaped
from serve_helpers import data_url, openai_client, running_server

QUESTION = "What is in this image?"


def _always(model, processor, text: str) -> None:
    """Make `text`'s one token the model's greedy choice at every step (a bias on the LM head's output)."""
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    head = model.lm.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[ids[0]] = 100.0
    head.register_forward_hook(lambda module, inputs, output: output + bias)


@pytest.mark.parametrize("make", [lambda: tiny_flamingo("llama"), tiny_otter_shaped], ids=["flamingo", "otter"])
@pytest.mark.parametrize(
    "token,answer", [(" the", "the the the the"), ("\x1c", "\x1c" * 4), ("\t", "")], ids=["space", "control", "tab"]
)
def test_generate_chat_prints_the_answer_the_server_sends(
    make, token, answer, tmp_path, monkeypatch, capsys, one_thread
):
    import flamingo.convert.auto
    from flamingo.cli import main

    model, processor = make()
    _always(model, processor, token)
    image = random_image(3)
    image.save(tmp_path / "a.png")
    monkeypatch.setattr(flamingo.convert.auto, "load_model", lambda *args, **kwargs: (model, processor))
    args = ["generate", "--model", "m", "--chat", "--prompt", QUESTION, "--image", str(tmp_path / "a.png")]
    assert main(args + ["--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n")  # the streamer's end of line
    assert main(args + ["--max-new-tokens", "4", "--num-beams", "2"]) == 0  # printed at the end, not streamed
    assert capsys.readouterr().out == printed
    engine = Engine(model, processor, max_batch=2)
    with running_server(engine, ServeSettings(model_name="m")) as url:
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": QUESTION}]
        messages = [{"role": "user", "content": content}]
        out = openai_client(url).chat.completions.create(model="m", max_tokens=4, temperature=0, messages=messages)
    assert out.usage.completion_tokens == 4
    assert out.choices[0].message.content == printed[:-1] == answer
