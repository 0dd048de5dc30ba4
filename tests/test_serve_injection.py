"""Chat text cannot write control tokens (serve/template.py): the tokenizer's special tokens (EOS, BOS, pad, ...)
in chat, Responses and `/tokenize` messages are a 400 naming the token, as `<image>` is, and the server keeps serving;
a reference model's `<image0>`... is one too where text parts spell it together (a user's whole `<imagek>` names an
image the conversation has shown: tests/test_serve_chat_references.py); a raw completion's prompt reads them as the
model reads text."""

from __future__ import annotations

import httpx
import pytest

from flamingo.chat import control_tokens
from flamingo.serve.app import ServeSettings
from flamingo.tiny import random_image, tiny_flamingo

from serve_helpers import data_url, engine_for, running_server

REFERENCES = 4  # the served model's reference tokens: <image0> ... <image3>


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    """A tiny model with image reference tokens (MMICL-style), served."""
    root = tmp_path_factory.mktemp("serve_injection")
    model, processor = tiny_flamingo("llama", "clip", gates=0.5, num_image_references=REFERENCES)
    model.save_pretrained(str(root / "m"), processor=processor)
    engine = engine_for(root / "m", max_batch=2)
    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        yield engine, url


def _requests(text: str, image: str) -> list[tuple[str, dict]]:
    """`text` where a client can put it: chat (a string, a text part beside an image, a system turn), Responses
    (input, an input_text part, instructions) and /tokenize messages."""
    user = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": f"what is {text}?"}]
    # split over two text parts, which the format joins with nothing between them
    split = [{"type": "text", "text": f"what is {text[:4]}"}, {"type": "text", "text": f"{text[4:]}?"}]
    split_input = [{"type": "input_text", "text": text[:4]}, {"type": "input_text", "text": text[4:]}]
    return [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": split}], "max_tokens": 2}),
        ("/v1/responses", {"input": [{"role": "user", "content": split_input}], "max_output_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"what is {text}?"}], "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": user}], "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "system", "content": text}, {"role": "user", "content": "Output:"}],
                "max_tokens": 2,
            },
        ),
        ("/v1/responses", {"input": f"what is {text}?", "max_output_tokens": 2}),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}], "max_output_tokens": 2},
        ),
        ("/v1/responses", {"input": "Output:", "instructions": text, "max_output_tokens": 2}),
        ("/tokenize", {"messages": [{"role": "user", "content": f"what is {text}?"}]}),
    ]


@pytest.mark.parametrize(
    "text, says",
    [
        ("<image0>", "reference token for image 0"),
        ("<image3>", "reference token for image 3"),
        ("<|endoftext|>", "EOS"),
        ("<PAD>", "pad token"),
    ],
)
def test_chat_text_holding_a_control_token_is_refused(served, text, says):
    """Before: `<|endoftext|>` / `<PAD>` became the EOS / pad rows silently. A reference tag is refused where two text
    parts spell it (a whole one is checked against the images shown: tests/test_serve_chat_references.py)."""
    _, url = served
    requests = _requests(text, data_url(random_image(1)))
    for path, body in requests[:2] if text.startswith("<image") else requests:
        response = httpx.post(url + path, json=body, timeout=60)
        assert response.status_code == 400, (path, body, response.text)
        error = response.json()["error"]
        assert (
            f"may not contain {text} ({'the tokenizer' if '<image' not in text else 'the model'}" in error["message"]
            and says in error["message"]
        ), error
        assert error["param"] in ("messages", "input", "instructions"), error
    ok = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Output:"}], "max_tokens": 1},
        timeout=60,
    )
    assert ok.status_code == 200


def test_a_marker_split_over_two_text_parts_is_refused(served):
    """The format joins a turn's text parts with nothing between them: `<ima` + `ge>` would be `<image>` in the
    prompt, an image token without an image."""
    _, url = served
    content = [{"type": "text", "text": "a <ima"}, {"type": "text", "text": "ge> b"}]
    response = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                              "max_tokens": 2}, timeout=60)
    assert response.status_code == 400 and "may not contain <image>" in response.json()["error"]["message"]
    apart = [{"type": "text", "text": "a <ima"}, {"type": "image_url", "image_url": {"url": data_url(random_image(1))}},
             {"type": "text", "text": "ge> b"}]  # an image between them: two texts, neither holds a marker
    response = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": apart}],
                                                              "max_tokens": 2}, timeout=60)
    assert response.status_code == 200, response.text


def test_tags_the_model_has_no_token_for_are_plain_text(served):
    """`<image7>` on a model with 4 reference tokens, and `<image0>`-like text that is no tag, tokenize as characters:
    no control token, so they are answered."""
    engine, url = served
    specials = set(engine.processor.tokenizer.all_special_ids)
    for text in ("<image7>", "<image 0>", "image0"):
        messages = [{"role": "user", "content": f"what is {text}?"}]
        ids = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
        assert not specials & set(ids), (text, ids)
        reply = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60)
        assert reply.status_code == 200, reply.text


def test_a_raw_completion_prompt_writes_special_tokens(served):
    """/v1/completions takes a raw prompt, read as the model reads text (docs/serve.md): special tokens written in
    it are those tokens."""
    engine, url = served
    tok = engine.processor.tokenizer
    prompt = f"Output:{tok.eos_token} a"
    assert tok.eos_token_id in httpx.post(url + "/tokenize", json={"prompt": prompt}, timeout=60).json()["tokens"]
    reply = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)
    assert reply.status_code == 200, reply.text


def test_control_tokens_name_each_special_token_and_reference(served):
    engine, _ = served
    control = control_tokens(engine.processor)
    tok = engine.processor.tokenizer
    assert control[tok.eos_token] == "the tokenizer's BOS/EOS"  # the tiny tokenizer's BOS is its EOS
    assert control[tok.pad_token] == "the tokenizer's pad token"
    assert [control[f"<image{k}>"] for k in range(REFERENCES)] == [
        f"the model's reference token for image {k}" for k in range(REFERENCES)
    ]
    assert set(tok.all_special_tokens) <= set(control)
    assert "<image4>" not in control


def test_an_assistant_turn_sent_back_keeps_its_reference_tokens(served):
    """Answers keep the reference tokens the model generated (`<image0>` in the text), so a conversation sent back
    holds them in its assistant turn: read as those tokens there, as the model wrote them. A user turn naming an
    image the conversation has not shown, or an assistant turn holding another control token, is still refused."""
    engine, url = served
    reference = engine.processor.tokenizer.convert_tokens_to_ids("<image0>")
    image = {"type": "image_url", "image_url": {"url": data_url(random_image(1))}}

    def conversation(answer: str, question: str = "and this?") -> list[dict]:
        return [{"role": "user", "content": [image, {"type": "text", "text": "which one is red?"}]},
                {"role": "assistant", "content": answer}, {"role": "user", "content": question}]

    ids = httpx.post(url + "/tokenize", json={"messages": conversation("the red one is <image0>")}, timeout=60)
    assert ids.status_code == 200 and reference in ids.json()["tokens"], ids.text
    reply = httpx.post(url + "/v1/chat/completions", json={"messages": conversation("the red one is <image0>"),
                                                           "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200, reply.text
    for messages, says in ((conversation("the red one", "is it <image1>?"), "<image1> refers to image 1"),
                           (conversation("it is <|endoftext|>"), "this assistant turn spells <|endoftext|>")):
        refused = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=60)
        assert refused.status_code == 400 and says in refused.json()["error"]["message"], refused.text
