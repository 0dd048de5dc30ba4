"""A user's `<imagek>` in chat on a model with image reference tokens (MMICL-style; docs/serve.md "Chat text"): a
system or user turn may name an image the conversation has shown, read as the reference token, and is refused (400,
naming the tag and the images shown there) when it names an image not shown at that point. The server's chat,
Responses and `/tokenize`, `flamingo generate --chat` and chat training data follow the one rule
(`ChatFormat.unshown_reference`) and give the same token ids and log-probabilities."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Engine
from flamingo.tiny import random_image, tiny_flamingo

from serve_helpers import data_url, running_server

REFERENCES = 4  # the served model's reference tokens: <image0> ... <image3>
QUESTION = "What colour is <image0>?"


@pytest.fixture(scope="module")
def served(one_thread):
    """A tiny model with image reference tokens and open gates, served (the model and its processor kept to compare
    with `generate --chat` and the data layer)."""
    model, processor = tiny_flamingo("llama", "clip", gates=0.5, num_image_references=REFERENCES)
    engine = Engine(model, processor, max_batch=2)
    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        yield model, processor, url


def _image(k: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(random_image(k))}}


def _user(*images: int, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [*(_image(k) for k in images), {"type": "text", "text": text}]}


def test_a_reference_to_a_shown_image_is_the_reference_token(served):
    """Before: every `<imagek>` the model has a token for was a 400 in a user's text, so a model tuned on MMICL-style
    conversations was refused the questions it was tuned on."""
    _, processor, url = served
    reference = processor.tokenizer.convert_tokens_to_ids("<image0>")
    tokens = httpx.post(url + "/tokenize", json={"messages": [_user(0, 1)]}, timeout=60)
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert ids.count(reference) == 1 and ids.index(reference) > ids.index(processor.media_token_id)
    reply = httpx.post(url + "/v1/chat/completions", json={"messages": [_user(0, 1)], "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200, reply.text
    later = [
        _user(0, text="Look."),
        {"role": "assistant", "content": "ok"},
        _user(1, text="Is <image1> like <image0>?"),
    ]
    assert (
        httpx.post(url + "/v1/chat/completions", json={"messages": later, "max_tokens": 2}, timeout=60).status_code
        == 200
    )  # images count across the conversation's messages
    responses = httpx.post(
        url + "/v1/responses",
        json={
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": data_url(random_image(0))},
                        {"type": "input_text", "text": QUESTION},
                    ],
                }
            ],
            "max_output_tokens": 2,
        },
        timeout=60,
    )
    assert responses.status_code == 200, responses.text


@pytest.mark.parametrize(
    "messages, says",
    [
        ([_user(text=QUESTION)], "messages[0]: <image0> refers to image 0, but the conversation shows no image"),
        (
            [_user(0, text="Is <image1> red?")],
            "messages[0]: <image1> refers to image 1, but the conversation shows only image 0 before it",
        ),
        # the flamingo format writes a turn's parts where they stand: the question comes before the image
        ([{"role": "user", "content": [{"type": "text", "text": QUESTION}, _image(0)]}], "no image before it"),
        (
            [{"role": "system", "content": "Answer about <image0>."}, _user(0, text="Output:")],
            "messages[0]: <image0> refers to image 0",
        ),
        (
            [_user(0, 1, text="Look."), {"role": "assistant", "content": "ok"}, _user(text="And <image2>?")],
            "messages[2]: <image2> refers to image 2, but the conversation shows only images 0-1 before it",
        ),
    ],
    ids=["no-image", "later-image", "image-after-text", "system", "third-message"],
)
def test_a_reference_to_an_image_not_shown_is_a_400_and_the_server_keeps_serving(served, messages, says):
    _, _, url = served
    for path, body in (
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 2}),
        ("/tokenize", {"messages": messages}),
    ):
        response = httpx.post(url + path, json=body, timeout=60)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert says in error["message"] and error["param"] == "messages", error
    ok = httpx.post(url + "/v1/chat/completions", json={"messages": [_user(0)], "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_responses_refuse_a_reference_to_an_image_not_shown(served):
    _, _, url = served
    response = httpx.post(url + "/v1/responses", json={"input": QUESTION, "max_output_tokens": 2}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "<image0> refers to image 0, but the conversation shows no image" in error["message"], error
    assert error["param"] in ("input", "instructions"), error


def test_a_reference_split_over_two_text_parts_and_other_control_tokens_stay_refused(served):
    """Only a tag written whole is a reference: `<ima` + `ge0>` would spell the token where the format writes the
    parts with nothing between them (refused, as a split marker is); EOS and pad stay refused."""
    model, processor, url = served
    split = [_image(0), {"type": "text", "text": "is <ima"}, {"type": "text", "text": "ge0> red?"}]
    tok = processor.tokenizer
    for content in (
        split,
        [_image(0), {"type": "text", "text": f"Stop{tok.eos_token} here"}],
        [_image(0), {"type": "text", "text": f"a {tok.pad_token} b"}],
    ):
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}], "max_tokens": 2},
            timeout=60,
        )
        assert response.status_code == 400 and "may not contain" in response.json()["error"]["message"], response.text
    # a tag the model has no token for is text, wherever it stands
    plain = httpx.post(url + "/tokenize", json={"messages": [_user(text="What is <image7>?")]}, timeout=60)
    assert plain.status_code == 200 and not set(tok.all_special_ids) & set(plain.json()["tokens"]), plain.text


def test_served_prompt_is_the_chat_data_row_without_its_answer(served, tmp_path):
    """A conversation row holding `<image0>` trains on the ids the server reads for its question (docs/data.md: a
    model tuned on conversations is served the prompts it was tuned on)."""
    from flamingo.data.sequence import IGNORE_INDEX
    from flamingo.data.sources import read_records
    from flamingo.data.spec import DatasetSpec

    _, processor, url = served
    for k in (0, 1):
        random_image(k).save(tmp_path / f"{k}.png")
    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "0.png"},
                    {"type": "image", "image": "1.png"},
                    {"type": "text", "text": QUESTION},
                ],
            },
            {"role": "assistant", "content": "red"},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    spec = DatasetSpec.create("chat", "chat", str(path), 1, {}, processor)
    (encoded,) = [spec.encode(record) for record in read_records(str(path))]
    first_trained = next(t for t, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    served_ids = httpx.post(url + "/tokenize", json={"messages": [_user(0, 1)]}, timeout=60).json()["tokens"]
    assert served_ids == encoded.input_ids[:first_trained]
    assert processor.tokenizer.convert_tokens_to_ids("<image0>") in served_ids


def test_generate_chat_reads_a_reference_as_the_server_does(served, tmp_path, monkeypatch, capsys):
    """`generate --chat` with the question naming its first --image: the prompt ids the server reads, the same first
    log-probabilities and the same greedy answer; naming an image it was not given exits 2 with the server's
    message."""
    import flamingo.convert.auto
    from flamingo.cli import main

    model, processor, url = served
    for k in (0, 1):
        random_image(k).save(tmp_path / f"{k}.png")
    monkeypatch.setattr(flamingo.convert.auto, "load_model", lambda *args, **kwargs: (model, processor))
    batches = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: (batches.append(kw), generate(**kw))[1])
    args = [
        "generate",
        "--model",
        "m",
        "--chat",
        "--image",
        str(tmp_path / "0.png"),
        "--image",
        str(tmp_path / "1.png"),
        "--max-new-tokens",
        "3",
    ]
    assert main(args + ["--prompt", QUESTION]) == 0
    printed = capsys.readouterr().out
    (batch,) = batches
    served_ids = httpx.post(url + "/tokenize", json={"messages": [_user(0, 1)]}, timeout=60).json()["tokens"]
    assert batch["input_ids"][0].tolist() == served_ids
    reply = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [_user(0, 1)], "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 1},
        timeout=60,
    ).json()
    assert reply["choices"][0]["message"]["content"] == printed.rstrip("\n")
    forward = {
        k: v
        for k, v in batch.items()
        if k not in ("max_new_tokens", "num_beams", "num_return_sequences", "repetition_penalty", "streamer")
    }
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**forward).logits[0, -1].float(), -1)
    first = reply["choices"][0]["logprobs"]["content"][0]
    assert abs(first["logprob"] - logprobs.max().item()) < 1e-4, (first, logprobs.max())
    served_error = httpx.post(
        url + "/tokenize", json={"messages": [_user(0, 1, text="Is <image2> red?")]}, timeout=60
    ).json()["error"]["message"]
    assert main(args + ["--prompt", "Is <image2> red?"]) == 2
    assert served_error.removeprefix("messages[0]: ") in capsys.readouterr().err


def test_models_card_gives_the_media_a_prompt_of_this_model_may_hold(served):
    """On a model with K reference tokens a prompt holds at most K images (more are a 400); /v1/models, where a
    client (lm-eval, the page) reads its limits, said the server's 32."""
    _, _, url = served
    card = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]
    assert card["max_images"] == REFERENCES
    at_limit = {"messages": [_user(*range(REFERENCES))], "max_tokens": 1}
    assert httpx.post(url + "/v1/chat/completions", json=at_limit, timeout=60).status_code == 200
    over = {"messages": [_user(*range(REFERENCES + 1))], "max_tokens": 1}
    reply = httpx.post(url + "/v1/chat/completions", json=over, timeout=60)
    assert reply.status_code == 400 and "reference tokens" in reply.text
