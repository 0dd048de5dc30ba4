"""EleutherAI's lm-evaluation-harness as a client of `flamingo serve` (the interop extra installs it): its
`local-completions` loglikelihood requests (batched; token ids or text; `echo`, `logprobs`, `max_tokens: 1`) get
`model.score`'s log-likelihoods and the greedy flag of an uncached forward; it finds the server's tokenizer endpoints
and tokenizes through them; its `local-chat-completions` generation requests, images included, get the server's
chat answer."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.api_models import JsonChatStr
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

from flamingo.tiny import random_image

from serve_helpers import data_url, serving_tiny

ATOL = 5e-3  # cached, batched decoding against one uncached forward (SHARP logits are large)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving_tiny(tmp_path_factory.mktemp("serve_lm_eval"), max_batch=8, prefill_chunk=16) as served:
        yield served


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # lm-eval's API models read one


def _forward_logprobs(engine, text):
    """log-softmax (T, V) of one uncached forward over `text`'s tokens (no media, no special tokens: as lm-eval
    tokenizes)."""
    ids = torch.tensor([engine.processor.tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_lm_evaluation_harness_scores_through_the_server(served, tmp_path, tokenized):
    """EleutherAI's lm-evaluation-harness (`local-completions`, its batched loglikelihood requests: `echo`,
    `logprobs`, `max_tokens: 1`, token ids or text) gets the log-likelihoods our own `model.score` gives, and its
    greedy flag; and its generation requests get the server's greedy answer."""
    engine, url = served
    engine.processor.tokenizer.save_pretrained(tmp_path)
    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="tiny", tokenizer=str(tmp_path),
                             tokenizer_backend="huggingface", tokenized_requests=tokenized, batch_size=2,
                             max_retries=1)
    pairs = [("Question: what is in the image? Short answer:", " a red circle."),
             ("Question: what is in the image? Short answer:", " a blue square."),
             ("A photo of", " a cat")]
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    tokenizer = engine.processor.tokenizer
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        whole = tokenizer.encode(context + continuation, add_special_tokens=False)
        continuation_ids = whole[len(context_ids):]  # lm-eval splits the whole text's tokens at the context's
        with torch.no_grad():
            expected = engine.model.score(torch.tensor([context_ids]), [continuation_ids])
        assert logprob == pytest.approx(float(expected[0]), abs=ATOL)
        reference = _forward_logprobs(engine, context + continuation)  # (T, V)
        start = len(context_ids)
        argmax = reference[start - 1:len(whole) - 1].argmax(-1).tolist()
        assert greedy == (argmax == continuation_ids)
    generated = lm.generate_until([Instance("generate_until", {}, ("A photo of", {"until": ["\n"],
                                                                                  "max_gen_toks": 5}), 0)])
    reply = httpx.post(url + "/v1/completions", timeout=60, json={"prompt": "A photo of", "max_tokens": 5,
                                                                  "stop": ["\n"], "temperature": 0}).json()
    assert generated == [reply["choices"][0]["text"]]


def test_lm_evaluation_harness_finds_the_servers_tokenizer(served, tmp_path):
    """lm-eval's `local-completions` with no tokenizer argument detects the tokenizer endpoints and tokenizes
    through them; its log-likelihoods equal those it computes with the model's Hugging Face tokenizer."""
    engine, url = served
    engine.processor.tokenizer.save_pretrained(tmp_path)
    pairs = [("Question: what is in the image? Short answer:", " a red circle."), ("A photo of", " a cat")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    remote = LocalCompletionsAPI(base_url=url + "/v1/completions", model="tiny", max_retries=1)
    assert remote.tokenizer_backend == "remote"
    local = LocalCompletionsAPI(base_url=url + "/v1/completions", model="tiny", tokenizer=str(tmp_path),
                                tokenizer_backend="huggingface", max_retries=1)
    by_remote, by_local = remote.loglikelihood(requests), local.loglikelihood(requests)
    assert [g for _, g in by_remote] == [g for _, g in by_local]
    assert [lp for lp, _ in by_remote] == pytest.approx([lp for lp, _ in by_local], abs=1e-4)


def test_lm_evaluation_harness_chat_generation_with_an_image(served):
    """`local-chat-completions` (lm-eval's client for chat servers and for its image tasks) sends OpenAI messages with
    an image part, temperature 0, stop strings and a seed: it gets the server's greedy chat answer."""
    _, url = served
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(random_image(4))}},
                                             {"type": "text", "text": "Question: what is in the image? Answer:"}]}]
    lm = LocalChatCompletion(base_url=url + "/v1/chat/completions", model="tiny", max_retries=1)
    generated = lm.generate_until([Instance("generate_until", {}, (JsonChatStr(json.dumps(messages)),
                                                                    {"until": ["\n"], "max_gen_toks": 6}), 0)])
    reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": messages, "max_tokens": 6, "temperature": 0, "stop": ["\n"]}).json()
    assert generated == [reply["choices"][0]["message"]["content"]]
