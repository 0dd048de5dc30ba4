"""EleutherAI's lm-evaluation-harness as a client of `flamingo serve` (the interop extra installs it): its
`local-completions` loglikelihood requests (batched; token ids or text; `echo`, `logprobs`, `max_tokens: 1`) get
`model.score`'s log-likelihoods and the greedy flag of an uncached forward (text only for a tokenizer that adds no
BOS: with one, token ids are exact and the server warns about text); it finds the server's tokenizer endpoints and
tokenizes through them; docs/serve.md's command runs through its CLI; its generation requests with 4 `until`
strings (5 stops with its EOS) get the server's answer; its `local-chat-completions` requests, hand-built with an
image part and shaped as its image tasks write them (`create_image_prompt`: the image parts, then the task's text
with its `<image>`), get the server's chat answer."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.api_models import JsonChatStr, create_image_prompt
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

from flamingo.serve.protocol import MAX_STOPS
from flamingo.tiny import random_image

from serve_helpers import data_url, serving_tiny

ATOL = 5e-3  # cached, batched decoding against one uncached forward (SHARP logits are large)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "serve.md"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve_lm_eval")


@pytest.fixture(scope="module")
def served(root, one_thread):
    with serving_tiny(root, max_batch=8, prefill_chunk=16) as served:  # the model saved under root / "model"
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


def _documented_command(first_word: str) -> list[str]:
    """The first command in docs/serve.md's bash blocks that starts with `first_word`, as argv."""
    for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith(first_word):
                return shlex.split(command)
    raise AssertionError(f"docs/serve.md has no `{first_word}` command")


@pytest.mark.slow
def test_the_documented_lm_eval_command_runs(served, root, tmp_path):
    """docs/serve.md's `lm_eval` command, run through lm-eval's CLI as written (its model directory and address
    filled in, a local multiple-choice task for hellaswag, no download), scores the task against the server: exit 0
    and its accuracy (over 8 s on 2 cores: lm-eval's start)."""
    _, url = served
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"question": "Question: what is in the image? Short answer:", "choices": [" a red circle.", " a cat"],
         "label": 0},
        {"question": "A photo of", "choices": [" a cat", " a dog sleeping", " nothing"], "label": 1}]))
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tasks' / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    argv = [word.replace("DIR", str(root / "model")).replace("http://127.0.0.1:8000", url)
            for word in _documented_command("lm_eval --model local-completions")]
    argv[argv.index("--tasks") + 1] = "tiny_mc"
    env = {**os.environ, "OPENAI_API_KEY": "unused", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    done = subprocess.run([sys.executable, "-m", "lm_eval", *argv[1:], "--include_path", str(tmp_path / "tasks"),
                           "--output_path", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert 0 <= json.loads(results.read_text())["results"]["tiny_mc"]["acc,none"] <= 1


def test_lm_evaluation_harness_generation_with_four_until_strings(served, tmp_path):
    """lm-eval's API models send a task's `until` strings and EOS as `stop`: with 4 `until` strings (its
    gsm8k_cot_llama's), 5 stops, past OpenAI's 4; the server takes up to MAX_STOPS and answers as it answers those
    stops sent by hand. More than MAX_STOPS, or an empty one, is a 400."""
    engine, url = served
    engine.processor.tokenizer.save_pretrained(tmp_path)
    until = ["\n\n", "Question:", "</s>", "<|im_end|>"]
    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="tiny", tokenizer=str(tmp_path),
                             tokenizer_backend="huggingface", max_retries=1)
    generated = lm.generate_until([Instance("generate_until", {}, ("A photo of", {"until": until,
                                                                                  "max_gen_toks": 6}), 0)])
    stops = [*until, engine.processor.tokenizer.eos_token]
    assert len(stops) == 5 <= MAX_STOPS
    reply = httpx.post(url + "/v1/completions", timeout=60, json={"prompt": "A photo of", "max_tokens": 6,
                                                                  "stop": stops, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert generated == [reply.json()["choices"][0]["text"]]
    for stop, status in ((["@"] * MAX_STOPS, 200), (["@"] * (MAX_STOPS + 1), 400), (["@", ""], 400)):
        answer = httpx.post(url + "/v1/completions", timeout=60,
                            json={"prompt": "A photo of", "max_tokens": 1, "stop": stop})
        assert answer.status_code == status, (len(stop), answer.text)
    assert f"at most {MAX_STOPS} non-empty strings" in answer.json()["error"]["message"]


def _image_task_messages(images, text):
    """A chat request as lm-eval's image tasks send one (`create_image_prompt`: the images as `image_url` parts
    first, then the task's text, which keeps its `<image>` placeholders)."""
    return create_image_prompt(images, [{"role": "user", "content": text}])


def test_lm_evaluation_harness_image_task_requests(served):
    """`local-chat-completions` on an Instance shaped as lm-eval's image tasks (chartqa's `<image>{{query}}` with
    the task's image) sends the image part, then the text with `<image>`: the server reads the `<image>` as the
    image's place, so the request has the prompt ids (/tokenize) and the answer of [image part, the question]. Two
    images placed inside the text are read where the text puts them; a count that differs from the media parts', or
    text before an image part, is still a 400."""
    _, url = served
    image, other = random_image(4), random_image(5)
    question = "Question: what is in the image? Answer:"
    lm = LocalChatCompletion(base_url=url + "/v1/chat/completions", model="tiny", max_retries=1)
    prompt = JsonChatStr(json.dumps([{"role": "user", "content": "<image>" + question}]))
    generated = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6},
                                                                   {"visual": [image]}), 0)])
    plain = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": question}]}]
    reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": plain, "max_tokens": 6, "temperature": 0, "stop": ["\n"]}).json()
    assert generated == [reply["choices"][0]["message"]["content"]]

    def tokens(messages):
        answer = httpx.post(url + "/tokenize", timeout=60, json={"messages": messages})
        return answer.status_code, answer.json().get("tokens")

    assert tokens(_image_task_messages([image], "<image>" + question)) == tokens(plain)
    two = _image_task_messages([image, other], "A <image> and B <image>?")
    placed = [{"role": "user", "content": [{"type": "text", "text": "A "}, two[0]["content"][0],
                                           {"type": "text", "text": " and B "}, two[0]["content"][1],
                                           {"type": "text", "text": "?"}]}]
    assert tokens(two)[0] == 200 and tokens(two) == tokens(placed)
    assert tokens(two) != tokens(_image_task_messages([image, other], "<image><image>A and B?"))
    refused = [_image_task_messages([image], "<image><image>" + question),  # more <image> than images
               _image_task_messages([image, other], "<image>" + question),  # fewer
               [{"role": "user", "content": [{"type": "text", "text": "<image>" + question},  # text first
                                             plain[0]["content"][0]]}],
               [{"role": "user", "content": [plain[0]["content"][0], {"type": "text", "text": "<image>Q"},
                                             plain[0]["content"][0]]}],  # an image after the text
               [{"role": "system", "content": "<image>"}, *plain]]
    for k, messages in enumerate(refused):
        answer = httpx.post(url + "/v1/chat/completions", timeout=60, json={"messages": messages, "max_tokens": 1})
        message = answer.json()["error"]["message"]
        assert answer.status_code == 400 and "may not contain <image>" in message, messages
        assert ("max_images" in message) == (k < 2), message  # a count that differs: lm-eval's cut is named


def test_lm_evaluation_harness_sends_a_multi_image_question_whole_with_max_images(served, caplog):
    """MMMU-style questions keep one `<image>` per image; lm-eval cuts a request's images to its `max_images` (1 by
    default), so such a question is a 400 that names the option (docs/serve.md), and runs with it set."""
    _, url = served
    images = [random_image(4), random_image(5)]
    prompt = JsonChatStr(json.dumps([{"role": "user", "content": "A <image> and B <image>: which is red?"}]))
    request = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 4}, {"visual": images}), 0)
    whole = LocalChatCompletion(base_url=url + "/v1/chat/completions", model="tiny", max_retries=1, max_images=2)
    assert len(whole.generate_until([request])) == 1
    cut = LocalChatCompletion(base_url=url + "/v1/chat/completions", model="tiny", max_retries=1)
    with pytest.raises(Exception, match="400"):
        cut.generate_until([request])
    assert "2 <image> for 1 medium (lm-evaluation-harness sends at most `max_images`" in caplog.text  # its log


def _bos_model():
    """A tiny model whose tokenizer adds a BOS `<s>` before every text, as LLaMA's does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from flamingo.build import from_backbones
    from flamingo.tiny import (
        set_gates,
        tiny_flamingo_config,
        tiny_image_processor,
        tiny_lm,
        tiny_tokenizer,
        tiny_vision,
    )

    backend = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>",
                                        unk_token=None)
    torch.manual_seed(0)
    model, processor = from_backbones(tiny_vision(), tiny_lm("llama", vocab_size=len(tokenizer),
                                                             initializer_range=1.0),
                                      tokenizer, tiny_flamingo_config(), image_processor=tiny_image_processor())
    set_gates(model, 0.5)
    return model.eval(), processor


def test_a_bos_tokenizer_is_exact_with_token_ids_and_text_is_warned_about(tmp_path, caplog, one_thread):
    """With a tokenizer that adds BOS, lm-eval's token ids get the log-likelihood of exactly the ids it sends (no
    BOS), and with its tokenizer and `add_bos_token=True` the one after a BOS; its text requests get a BOS added
    before the text (as vLLM's do), which it does not count: the server says so in its log, once."""
    from flamingo.serve.app import ServeSettings
    from flamingo.serve.engine import Engine

    from serve_helpers import running_server

    model, processor = _bos_model()
    tokenizer = processor.tokenizer
    tokenizer.save_pretrained(tmp_path)
    context, continuation = "The colour of the sky is", " blue"
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)

    def direct(bos: bool) -> float:
        ids = [tokenizer.bos_token_id] * bos + whole
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
        start = len(ids) - (len(whole) - len(context_ids))
        return sum(float(logprobs[start - 1 + i, t]) for i, t in enumerate(whole[len(context_ids):]))

    request = [Instance("loglikelihood", {}, (context, continuation), 0)]
    with running_server(Engine(model, processor, max_batch=4), ServeSettings(model_name="bos")) as url, \
            caplog.at_level(logging.WARNING, logger="flamingo.serve.app"):
        base = dict(base_url=url + "/v1/completions", model="bos", max_retries=1)
        hf = dict(tokenizer=str(tmp_path), tokenizer_backend="huggingface")
        (ids_score, _), = LocalCompletionsAPI(**base).loglikelihood(request)
        (bos_score, _), = LocalCompletionsAPI(**base, **hf, add_bos_token=True).loglikelihood(request)
        assert not caplog.records  # token ids: nothing to say
        text = LocalCompletionsAPI(**base, **hf, tokenized_requests=False)
        (text_score, _), = text.loglikelihood(request)
        text.loglikelihood(request)
    assert ids_score == pytest.approx(direct(False), abs=ATOL)
    assert bos_score == pytest.approx(direct(True), abs=ATOL)
    assert text_score != pytest.approx(direct(True), abs=1.0)  # a token late: the context's last one counted
    warnings = [r.getMessage() for r in caplog.records if "BOS" in r.getMessage()]
    assert len(warnings) == 1 and "tokenized_requests=False" in warnings[0], warnings
