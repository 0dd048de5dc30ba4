"""vLLM's tokenizer endpoints on `flamingo serve` (`/tokenize`, `/detokenize`, `/tokenizer_info`): a prompt's ids are
the ones its completion request is billed for (raw prompts with images, chat messages), they decode back, and
lm-evaluation-harness, finding them, tokenizes through the server with no tokenizer of its own."""

from __future__ import annotations

import httpx
import pytest

from flamingo.tiny import random_image

from serve_helpers import SHOT, data_url, serving_tiny

QUERY = "<image>Question: what is in the image? Short answer:"


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving_tiny(tmp_path_factory.mktemp("serve_tokenize"), max_batch=4, prefill_chunk=32) as served:
        yield served


def test_tokenize_gives_the_ids_a_request_is_billed_for(served):
    engine, url = served
    media = [random_image(1), random_image(2)]
    prompt = SHOT + QUERY
    tokens = httpx.post(url + "/tokenize", json={"prompt": prompt}, timeout=30).json()
    assert tokens["tokens"] == engine.processor.encode_prompt(prompt, media)[0] and tokens["count"] == len(
        tokens["tokens"])
    billed = httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": prompt, "media": [data_url(m) for m in media], "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert billed == tokens["count"]
    bare = httpx.post(url + "/tokenize", json={"prompt": "A photo of", "add_special_tokens": False}, timeout=30)
    assert bare.json()["tokens"] == engine.processor.tokenizer.encode("A photo of", add_special_tokens=False)

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(media[0])}},
                                             {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "a circle."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(media[1])}},
                                             {"type": "text", "text": "And this?"}]}]
    counted = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=30).json()["count"]
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60).json()
    assert counted == chat["usage"]["prompt_tokens"]


def test_detokenize_and_tokenizer_info(served):
    engine, url = served
    ids = httpx.post(url + "/tokenize", json={"prompt": QUERY}, timeout=30).json()["tokens"]
    assert httpx.post(url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"] == \
        engine.processor.decode(ids, skip_special_tokens=False)
    info = httpx.get(url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == engine.processor.tokenizer.eos_token
    assert info["media_token_id"] == engine.processor.media_token_id and info["media_token"] == "<image>"


@pytest.mark.parametrize("path,body,says", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "either prompt or messages"),
    ("/tokenize", {}, "either prompt or messages"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "a"}]}, "last message"),
    ("/detokenize", {"tokens": [1, 10**9]}, "token ids must be in"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_tokenizer_requests_get_a_clear_400(served, path, body, says):
    _, url = served
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == 400 and says in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("saved_setting", [True, False])
def test_a_declared_image_prompt_is_tokenized_as_its_completion_reads_it(tmp_path, one_thread, saved_setting):
    """A model with image references (MMICL-style declarations, `Image 0 is <image0>`): `/tokenize` resolves a raw
    prompt's declarations as the completions endpoint does (one medium per declaration), so its count is what the
    completion is billed for; a prompt whose declarations are wrong is a 400, as its completion would be. Whether or
    not the processor was saved with `image_references` (`flamingo train` saves it false): a prompt that places no
    <image> and declares its media is read as declared."""
    from flamingo.serve.app import ServeSettings
    from flamingo.tiny import tiny_flamingo

    from serve_helpers import engine_for, running_server

    model, processor = tiny_flamingo("llama", num_image_references=4)
    processor.image_references = saved_setting
    model.save_pretrained(str(tmp_path / "m"), processor=processor)
    engine = engine_for(tmp_path / "m", max_batch=2)
    prompt = "Image 0 is <image0>. Image 1 is <image1>. Question: what is in <image0>? Short answer:"
    media = [random_image(1), random_image(2)]
    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        tokens = httpx.post(url + "/tokenize", json={"prompt": prompt}, timeout=30).json()
        assert tokens["tokens"] == engine.processor.encode_prompt(prompt, media)[0]
        billed = httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": prompt, "media": [data_url(m) for m in media], "max_tokens": 1}).json()["usage"]
        assert billed["prompt_tokens"] == tokens["count"]
        bad = {"prompt": "Is <image0> red? Image 0 is <image0>."}
        answer = httpx.post(url + "/tokenize", json=bad, timeout=30)
        if saved_setting:  # declarations that do not resolve: the completion with media would be refused alike
            assert answer.status_code == 400 and "prompt" in answer.json()["error"]["param"]
        else:  # read as written, as its completion without media is (no media are sent here)
            assert answer.status_code == 200
            assert answer.json()["tokens"] == engine.processor.encode_prompt(bad["prompt"])[0]
