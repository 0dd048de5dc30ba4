"""Log-probabilities, penalties and logit bias in `flamingo serve` (serve/logprobs.py, serve/sampling.py,
model/logprobs.py): what the server reports equals the log-softmax of one uncached forward over the prompt and the
answer, alone or batched; `echo` with `max_tokens: 0` gives the prompt's (an evaluation harness's loglikelihood
request), with the prefix cache holding the prompt or not; penalties and biases change greedy tokens exactly as
OpenAI defines them; token texts and bytes join back into the text; a token never chosen (`<image>`) is still
ranked in `top_logprobs`. Through the official `openai` client."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from flamingo.chat import BLANKS
from flamingo.detokenize import IncrementalText
from flamingo.processing import FlamingoProcessor, add_flamingo_tokens
from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Engine, find_stop
from flamingo.serve.logprobs import CompletionLogprobs, TokenStrings
from flamingo.serve.sampling import SamplingParams
from flamingo.tiny import random_image, tiny_flamingo, tiny_tokenizer

from serve_helpers import SHARP, SHOT, data_url, openai_client, running_server, serving_tiny, submit_job

QUERY = "<image>Question: what is in the image? Short answer:"
ATOL = 5e-3  # cached, batched decoding against one uncached forward (SHARP logits are large)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    with serving_tiny(tmp_path_factory.mktemp("serve_logprobs"), max_batch=8, prefill_chunk=16) as served:
        yield served


def _forward_logprobs(engine, prompt, media, continuation=()):
    """log-softmax (T, V) of one uncached forward over the prompt and `continuation`; the prompt's ids."""
    batch = engine.processor(prompt, images=media)
    prompt_ids = batch["input_ids"][0].tolist()
    ids = torch.tensor([prompt_ids + list(continuation)])
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **rest).logits[0]
    return logits.float().log_softmax(-1), prompt_ids


def _raw(prompt, media, **kwargs):
    return {"prompt": prompt, "media": [data_url(m) for m in media], "temperature": 0, **kwargs}


def _run_job(engine, prompt, media, params):
    return submit_job(engine, prompt, media, params)()


def test_completion_logprobs_equal_an_uncached_forward(served):
    """Each generated token's log-probability and top-3 alternatives equal those of one uncached forward over the
    prompt and the answer; the tokens' texts are the answer."""
    engine, url = served
    strings = TokenStrings(engine.processor.tokenizer)
    for seed in (2, 3):
        prompt, media = SHOT + QUERY, [random_image(1), random_image(seed)]
        reply = openai_client(url).completions.create(model="tiny", prompt=prompt, max_tokens=8, logprobs=3,
                                                      temperature=0, extra_body={"media": [data_url(m) for m in media]})
        lp = reply.choices[0].logprobs
        assert lp.tokens
        answer = []  # the greedy answer of the uncached reference, token by token
        for text, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            last = _forward_logprobs(engine, prompt, media, answer)[0][-1]  # (V,)
            allowed = last.clone()
            allowed[engine.suppress] = -float("inf")
            chosen = int(allowed.argmax())
            assert text == strings(chosen)[0]
            assert value == pytest.approx(float(last[chosen]), abs=ATOL)
            best = last.topk(3)
            # a dict by token text: the token itself with its own value (as OpenAI's), then the alternatives, those
            # with one text (ids past the tokenizer's, "") keeping the likeliest
            assert top[text] == value
            assert all(min(abs(v - b) for b in best.values.tolist() + [value]) < ATOL for v in top.values())
            assert max(top.values()) == pytest.approx(float(best.values[0]), abs=ATOL)
            assert len(top) == len({text} | {strings(int(i))[0] for i in best.indices})
            answer.append(chosen)
        in_text = lp.tokens[:-1] if reply.choices[0].finish_reason == "stop" else lp.tokens
        if not any("\ufffd" in t for t in in_text):
            assert "".join(in_text) == reply.choices[0].text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]


def test_logprobs_in_a_batch_equal_alone(served):
    """Rows decoded together (the requests queued before the engine starts, so they share decode steps) report
    the tokens and log-probabilities each reports alone."""
    engine, _ = served
    jobs = [(SHOT + QUERY, [random_image(1), random_image(40 + i)]) for i in range(4)]
    params = SamplingParams(8, temperature=0.0, logprobs=2)
    alone = [_run_job(engine, prompt, media, params) for prompt, media in jobs]
    together = Engine(engine.model, engine.processor, max_batch=8, prefill_chunk=16)
    waits = [submit_job(together, prompt, media, params) for prompt, media in jobs]
    together.start()
    try:
        batched = [wait() for wait in waits]
    finally:
        together.stop(0.0)
    rendered = together.metrics.render()
    steps = float(rendered.split("flamingo_batch_size_count ")[1].split()[0])
    rows = float(rendered.split("flamingo_batch_size_sum ")[1].split()[0])
    assert rows / steps > 1.5, (rows, steps)  # they did share steps
    for (tokens, events), (tokens_b, events_b) in zip(alone, batched):
        assert tokens_b == tokens
        values = [e.logprobs for e in events if e.kind == "delta" and e.logprobs is not None]
        values_b = [e.logprobs for e in events_b if e.kind == "delta" and e.logprobs is not None]
        assert len(values) == len(values_b) > 0
        for a, b in zip(values, values_b):
            torch.testing.assert_close(b.logprobs, a.logprobs, atol=ATOL, rtol=0)
            assert b.top_ids.tolist() == a.top_ids.tolist()
            torch.testing.assert_close(b.top_logprobs, a.top_logprobs, atol=ATOL, rtol=0)


def test_chat_logprobs_stream_and_whole_answer_agree(served):
    """Chat: `logprobs.content` entries carry the token, its log-probability, its bytes and `top_logprobs`
    alternatives (likeliest first); the streamed chunks' entries are the whole answer's."""
    engine, url = served
    client = openai_client(url)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(random_image(5))}},
                                             {"type": "text", "text": "Describe:"}]}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    entries = whole.choices[0].logprobs.content
    assert entries and len(entries) <= 6
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-6 and e.logprob <= 0
        if "\ufffd" not in e.token:  # else a part of a character: its bytes are the token's own
            assert bytes(e.bytes).decode() == e.token
    in_text = entries[:-1] if whole.choices[0].finish_reason == "stop" else entries  # the stop token is listed
    text = b"".join(bytes(e.bytes) for e in in_text).decode(errors="replace")
    assert text.lstrip(BLANKS) == whole.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-6)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


@pytest.mark.parametrize("warm", ["cold", "cache-without-logprobs", "cache-with-logprobs"])
def test_echo_with_max_tokens_0_gives_the_prompts_logprobs(served, warm):
    """A loglikelihood request as evaluation harnesses send it (`echo`, `logprobs`, `max_tokens: 0`): the prompt
    comes back with each token's log-probability under one uncached forward (the first token has none), nothing is
    generated. The prefix cache serves it only blocks stored with their log-probabilities (by an earlier echo), the
    values the same; blocks stored by a plain request keep none and are computed again."""
    engine, url = served
    seed = {"cold": 11, "cache-without-logprobs": 13, "cache-with-logprobs": 15}[warm]
    media = [random_image(seed), random_image(seed + 1)]
    prompt = SHOT + QUERY + " a blue square."
    if warm == "cache-without-logprobs":
        httpx.post(url + "/v1/completions", json=_raw(prompt, media, max_tokens=1), timeout=60).raise_for_status()
    elif warm == "cache-with-logprobs":  # another answer after the same prompt: shares all its whole blocks
        httpx.post(url + "/v1/completions", json=_raw(prompt + " no", media, max_tokens=0, echo=True, logprobs=1),
                   timeout=60).raise_for_status()
    reply = httpx.post(url + "/v1/completions", json=_raw(prompt, media, max_tokens=0, echo=True, logprobs=2),
                       timeout=60).json()
    choice = reply["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert reply["usage"]["completion_tokens"] == 0 and (cached > 16) == (warm == "cache-with-logprobs"), cached
    reference, prompt_ids = _forward_logprobs(engine, prompt, media)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt_ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = reference[torch.arange(len(prompt_ids) - 1), torch.tensor(prompt_ids[1:])]
    assert lp["token_logprobs"][1:] == pytest.approx(expected.tolist(), abs=ATOL)
    for position, top in enumerate(lp["top_logprobs"][1:]):
        assert len(top) <= 3 and top[lp["tokens"][position + 1]] == lp["token_logprobs"][position + 1]  # k + 1
        assert max(top.values()) == pytest.approx(float(reference[position].max()), abs=ATOL)
    # echo with an answer: the prompt's entries, then the answer's
    reply = httpx.post(url + "/v1/completions", json=_raw(prompt, media, max_tokens=3, echo=True, logprobs=0),
                       timeout=60).json()
    choice = reply["choices"][0]
    assert choice["text"].startswith(prompt)
    generated = reply["usage"]["completion_tokens"]
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids) + generated  # a stop token listed too
    assert choice["logprobs"]["token_logprobs"][1:len(prompt_ids)] == pytest.approx(expected.tolist(), abs=ATOL)


def test_echo_streams_the_prompt_first(served):
    _, url = served
    media = [random_image(13)]
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json=_raw(QUERY, media, max_tokens=2, echo=True, logprobs=1, stream=True)) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    first = json.loads(lines[0][6:])["choices"][0]
    assert first["text"] == QUERY and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) > 5


def _greedy_reference(engine, prompt, media, steps, frequency=0.0, presence=0.0, bias=()):
    """Greedy decoding by uncached forwards, with OpenAI's penalties over the generated tokens and the biases."""
    answer = []
    for _ in range(steps):
        row, _ = _forward_logprobs(engine, prompt, media, answer)
        logits = row[-1].clone()  # log-softmax differs from the logits by a constant per position: same choice
        for t in set(answer):
            logits[t] -= answer.count(t) * frequency + presence
        for t, b in bias:
            logits[t] += b
        logits[engine.suppress] = -float("inf")
        answer.append(int(logits.argmax()))
        if answer[-1] in engine.eos:
            break
    return answer


@pytest.fixture(scope="module")
def gentle(one_thread):
    """An engine whose LM's logits are close enough for penalties in OpenAI's range to matter (the `SHARP` models'
    margins are tens of logits) and whose greedy answer repeats tokens."""
    model, processor = tiny_flamingo("llama", "clip", gates=0.5, seed=0, lm_overrides={"initializer_range": 0.2})
    engine = Engine(model, processor, max_batch=4, prefill_chunk=16)
    engine.start()
    yield engine
    engine.stop(0.0)


PENALTIES = [(0.25, 0.0), (0.0, 0.25), (0.25, 0.25), (-0.3, 0.0), (0.0, -0.3)]


def test_penalties_change_greedy_tokens_as_openai_defines_them(gentle):
    """frequency / presence penalties over the generated tokens: the engine's greedy tokens equal those of uncached
    forwards with OpenAI's formula; each setting gives its own answer, none the plain one."""
    prompt, media = SHOT + QUERY, [random_image(1), random_image(21)]
    answers = []
    for frequency, presence in PENALTIES:
        params = SamplingParams(12, temperature=0.0, frequency_penalty=frequency, presence_penalty=presence)
        tokens, _ = _run_job(gentle, prompt, media, params)
        assert tokens == _greedy_reference(gentle, prompt, media, 12, frequency, presence), (frequency, presence)
        answers.append(tuple(tokens))
    plain = tuple(_greedy_reference(gentle, prompt, media, 12))
    assert len(set(answers)) == len(answers) and plain not in answers


def test_logit_bias_forces_and_bans_tokens(served):
    """A bias of +100 makes every token the biased one; -100 bans the unbiased first token, and the answer is
    then the reference's with that bias."""
    engine, _ = served
    prompt, media = SHOT + QUERY, [random_image(1), random_image(21)]
    plain = _greedy_reference(engine, prompt, media, 6)
    forced = engine.processor.tokenizer.encode(" red", add_special_tokens=False)[0]
    tokens, _ = _run_job(engine, prompt, media, SamplingParams(5, temperature=0.0, logit_bias=((forced, 100.0),)))
    assert tokens == [forced] * 5
    banned = ((plain[0], -100.0),)
    tokens, _ = _run_job(engine, prompt, media, SamplingParams(6, temperature=0.0, logit_bias=banned))
    assert tokens[0] != plain[0] and tokens == _greedy_reference(engine, prompt, media, 6, bias=banned)


def test_logit_bias_over_http(served):
    engine, url = served
    forced = engine.processor.tokenizer.encode(" red", add_special_tokens=False)[0]
    reply = openai_client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say:"}],
                                                 max_tokens=4, temperature=0, logit_bias={str(forced): 100})
    text = TokenStrings(engine.processor.tokenizer)(forced)[0]
    assert reply.choices[0].message.content == (text * 4).lstrip(BLANKS)


def test_a_stop_string_never_matches_a_character_still_being_decoded(served):
    """`"\ufffd"` as a stop string: a first byte of a two-byte character decodes to U+FFFD until its second byte
    comes, so it must not stop there; nor at the two U+FFFDs a SentencePiece byte-fallback decode writes for the
    first two bytes of a three-byte character ("中": E4 B8 AD). A U+FFFD that text follows is a real one, and stops;
    at the end, any does."""
    assert find_stop("caf\ufffd", ["\ufffd"], final=False) == -1
    assert find_stop("caf\ufffd", ["\ufffd"], final=True) == 3
    assert find_stop("a\ufffd\ufffd", ["\ufffd"], final=False) == -1
    assert find_stop("a\ufffd\ufffd", ["\ufffd"], final=True) == 1
    assert find_stop("a\ufffdb", ["\ufffd", "b"], final=False) == 1
    engine, url = served
    lead = engine.processor.tokenizer.encode("\u00e9", add_special_tokens=False)[0]  # 0xC3 of "é" (0xC3 0xA9)
    assert TokenStrings(engine.processor.tokenizer)(lead)[1] == b"\xc3"
    reply = openai_client(url).completions.create(model="tiny", prompt="Say:", max_tokens=5, temperature=0,
                                                  logit_bias={str(lead): 100}, stop=["\ufffd"])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].text == ""
    assert reply.usage.completion_tokens == 5  # each 0xC3 may be a character's start until text follows it


def _streamed(url, body):
    """A completions stream's text and its chunks' logprobs lists joined; each chunk's offsets checked to start in
    the text sent up to it (at its end only in the finish chunk: a stop string's tokens)."""
    text, lists = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                for key, values in (choice["logprobs"] or {}).items():
                    lists[key] += values
                offsets = (choice["logprobs"] or {}).get("text_offset", [])
                if choice["finish_reason"] is None:
                    assert all(o < len(text) for o in offsets), (text, offsets)
                assert all(o <= len(text) for o in offsets), (text, offsets)
    return text, lists


def test_no_offset_passes_the_end_of_a_text_a_stop_string_cut(served):
    """A stop string leaves its characters out of the text, not its tokens out of the lists (usage counts them):
    the tokens from the cut on are at the text's end, whole and streamed alike."""
    _, url = served
    body = {"prompt": "hello there", "max_tokens": 16, "temperature": 0, "logprobs": 1}
    free = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    text, offsets = free["text"], free["logprobs"]["text_offset"]
    # a stop string of three tokens' text, the last two starting past where it starts (no U+FFFD: one at the end
    # may be a character still being decoded, so it stops a token later)
    starts = [i for i in range(1, len(offsets) - 3) if offsets[i] < offsets[i + 1] < offsets[i + 2] < offsets[i + 3]
              and text.find(text[offsets[i]:offsets[i + 3]]) == offsets[i]
              and "\ufffd" not in text[offsets[i]:offsets[i + 3]]]
    assert starts, free
    i = starts[0]
    cut, stop = offsets[i], text[offsets[i]:offsets[i + 3]]
    whole = httpx.post(url + "/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[:cut]
    assert choice["logprobs"]["tokens"] == free["logprobs"]["tokens"][:i + 3] and whole["usage"][
        "completion_tokens"] == i + 3
    assert choice["logprobs"]["text_offset"] == [min(o, cut) for o in offsets[:i + 3]]
    streamed_text, streamed = _streamed(url, {**body, "stop": [stop]})
    assert streamed_text == choice["text"] and streamed == choice["logprobs"]
    assert _streamed(url, body) == (text, free["logprobs"])


BAD = {
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    "top_logprobs over 20": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "chat logprobs as a number": ({"logprobs": 3}, "logprobs"),
    "penalty out of range": ({"presence_penalty": 2.5}, "presence_penalty"),
    "bias key not a token id": ({"logit_bias": {"red": 5}}, "not a token id"),
    "bias id past the vocabulary": ({"logit_bias": {"999999": 5}}, "not a token id"),
    "bias id in full-width digits": ({"logit_bias": {"\uff11\uff12": 5}}, "not a token id"),  # int() reads 12
    "bias out of range": ({"logit_bias": {"5": 101}}, "[-100, 100]"),
    "completions logprobs over 5": ({"prompt": "Say:", "logprobs": 6}, "logprobs"),
    "max_tokens 0 without echo": ({"prompt": "Say:", "max_tokens": 0}, "echo"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_logprob_and_penalty_fields_get_a_clear_400(served, case):
    _, url = served
    fields, says = BAD[case]
    raw = "prompt" in fields
    body = ({"max_tokens": 2} if raw else {"messages": [{"role": "user", "content": "Say:"}], "max_tokens": 2})
    response = httpx.post(url + ("/v1/completions" if raw else "/v1/chat/completions"), json={**body, **fields},
                          timeout=60)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]
    assert httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say:"}],
                                                          "max_tokens": 1}, timeout=60).status_code == 200


@pytest.mark.parametrize("text", ["naïve café 🦩 — ok", "plain words only", "日本語のテキスト"])
def test_token_texts_and_bytes_join_back_into_the_text(text):
    """Byte-level BPE splits a character over tokens: their texts hold U+FFFD, their bytes rebuild it."""
    tokenizer = tiny_tokenizer()
    strings = TokenStrings(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(strings(i)[1] for i in ids) == text.encode()
    if all("\ufffd" not in strings(i)[0] for i in ids):
        assert "".join(strings(i)[0] for i in ids) == text


def _byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE (Llama's): a few pieces, every other character as its UTF-8 bytes' `<0xNN>`
    byte-fallback tokens, a `▁` for each space and one before the text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "c", "e", "f", "é", "▁a", "▁c", "af"):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "c"), ("a", "f")], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("make", [tiny_tokenizer, _byte_fallback_tokenizer], ids=["byte-level", "byte-fallback"])
def test_a_stop_string_of_u_fffd_never_cuts_a_character_of_the_answer(make):
    """An answer's text as the engine holds it token by token (`IncrementalText`): while a three-byte character is
    two bytes in, a byte-fallback decode ends in two U+FFFDs, neither of which a `"\ufffd"` stop string matches."""
    tokenizer = make()
    add_flamingo_tokens(tokenizer)
    text = IncrementalText(FlamingoProcessor(tokenizer, None))
    for token in tokenizer.encode("a中b 🦩 c", add_special_tokens=False):
        text.add(token)
        assert find_stop(text.text, ["\ufffd"], final=False) == -1, text.text
    text.flush()
    assert text.text.strip() == "a中b 🦩 c" and find_stop(text.text, ["\ufffd"], final=True) == -1


@pytest.mark.parametrize("make", [tiny_tokenizer, _byte_fallback_tokenizer], ids=["byte-level", "byte-fallback"])
@pytest.mark.parametrize("text", ["Output: 中文 and more", "😀 a", "a 中文 caf", "naïve café 🦩 — ok"])
def test_text_offsets_count_a_character_split_over_tokens_once(make, text):
    """A character split over byte tokens (each reading "\ufffd") is one character of the text: each token's
    `text_offset` is the start of the character its first byte belongs to (the tokens after a character's first
    until it is whole share it), never past the text, and the next text starts at `len(text)` (before: each byte
    token counted a character, so every later offset drifted past the text)."""
    tokenizer = make()
    strings = TokenStrings(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in strings(i)[0] for i in ids)  # the tokenizer does split a character
    logprobs = CompletionLogprobs(strings)
    offsets = logprobs.add_prompt(ids, None, text)["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] < len(text) and logprobs.offset == len(text)
    joined = b"".join(strings(i)[1] for i in ids)
    lead = len(joined) - len(text.encode())  # the space a SentencePiece tokenizer writes before the text
    assert joined[lead:] == text.encode()
    for i, offset in enumerate(offsets):
        before = b"".join(strings(t)[1] for t in ids[:i])[lead:]
        assert offset == len(before.decode("utf-8", "ignore")), (i, offsets)  # the character the token is in
    answer = logprobs.add(tokenizer.encode(" b", add_special_tokens=False), None)
    assert answer["text_offset"][0] == len(text)


@pytest.mark.parametrize("make", [tiny_tokenizer, _byte_fallback_tokenizer], ids=["byte-level", "byte-fallback"])
def test_echoed_offsets_skip_the_space_a_legacy_tokenizer_writes_after_a_special_token(make):
    """A LLaMA-1-era tokenizer (`Prepend("▁")`, as `_byte_fallback_tokenizer`'s) writes a `▁` at the start of each
    text run, after `<image>` and `<|endofchunk|>` too, which the prompt's text does not hold: those count no
    character, so that every offset indexes the prompt and the answer starts at `len(prompt)`."""
    tokenizer = make()
    add_flamingo_tokens(tokenizer)
    processor = FlamingoProcessor(tokenizer, None)
    strings = TokenStrings(tokenizer, processor.hidden_ids)
    prompt = "<image>Output: a café.<|endofchunk|><image>Output:中 b"
    ids = processor.prompt_ids(prompt)
    logprobs = CompletionLogprobs(strings)
    got = logprobs.add_prompt(ids, None, prompt)
    offsets = got["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] < len(prompt) and logprobs.offset == len(prompt)
    found = [(t.strip(), o) for t, o in zip(got["tokens"], offsets) if t.strip() and "\ufffd" not in t]
    assert all(prompt[o:].lstrip().startswith(t) for t, o in found), found
    assert logprobs.add(tokenizer.encode(" b", add_special_tokens=False), None)["text_offset"][0] == len(prompt)
    odd = "<image>a \u2581 b<|endofchunk|>\u2581c"  # a SentencePiece tokenizer spells a `▁` the text holds as a space
    logprobs = CompletionLogprobs(strings)
    offsets = logprobs.add_prompt(processor.prompt_ids(odd), None, odd)["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(odd) and logprobs.offset == len(odd)


def test_text_offsets_after_a_character_left_unfinished():
    """A first byte the next token does not continue is a U+FFFD of the text (as the answer's text writes it): the
    next token starts after it."""
    tokenizer = tiny_tokenizer()
    strings = TokenStrings(tokenizer)
    lead, tail = tokenizer.encode("\u00e9", add_special_tokens=False)  # 0xC3 0xA9
    for ids, offsets in (([lead, *tokenizer.encode(" to", add_special_tokens=False)], [0, 1]),
                         ([lead, lead, tail, lead], [0, 1, 1, 2])):
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        got = CompletionLogprobs(strings).add(ids, None)["text_offset"]
        assert got[:len(offsets)] == offsets and all(o <= len(text) for o in got), (text, got)


def test_an_answers_control_token_takes_no_characters_of_its_text():
    """A generated control token (a pad, `<|endofchunk|>`) is listed, but the answer's text leaves it out: the next
    token's offset is where its own text starts."""
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    processor = FlamingoProcessor(tok, None)
    pad = tok.convert_tokens_to_ids(tok.pad_token)
    ids = tok.encode("a b", add_special_tokens=False) + [pad] + tok.encode(" c", add_special_tokens=False)
    text = processor.decode(ids)
    got = CompletionLogprobs(TokenStrings(tok, processor.hidden_ids)).add(ids, None)
    assert got["tokens"][len(ids) - 2] == tok.pad_token
    assert [text[o:o + len(t)] for o, t in zip(got["text_offset"], got["tokens"]) if t != tok.pad_token] == \
        [t for t in got["tokens"] if t != tok.pad_token] and got["text_offset"][-1] == len(text) - len(" c")


@pytest.mark.parametrize("prompt", ["Output: 中文 and more", "😀 Output: a"])
def test_echoed_offsets_index_a_multi_byte_text(served, prompt):
    """Over HTTP: echo with logprobs of a prompt with characters split over tokens; every offset is within the
    choice's text, the answer's first token is at `len(prompt)`, and a whole token's text is where its offset says."""
    engine, url = served
    for max_tokens in (0, 6):
        body = {"prompt": prompt, "max_tokens": max_tokens, "echo": True, "logprobs": 0, "temperature": 0}
        choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
        offsets = lp["text_offset"]
        assert offsets == sorted(offsets) and all(o <= len(text) for o in offsets), (offsets, len(text))
        assert text.startswith(prompt)
        listed = len(offsets) - (choice["finish_reason"] == "stop")  # a stop token is listed, not in the text
        for token, offset in list(zip(lp["tokens"], offsets))[:listed]:
            if "\ufffd" not in token:  # else a part of a character
                assert text[offset:offset + len(token)] == token, (token, offset, text)
        if max_tokens:
            assert offsets[len(engine.processor.prompt_ids(prompt))] == len(prompt), offsets


def test_a_list_of_prompts_answers_each_as_alone(served):
    """The completions API's prompt list (texts or token ids): prompt k's choice j is choice k * n + j, each the
    answer that prompt gets alone; the usage adds up."""
    engine, url = served
    texts = ["Question: what colour? Answer:", "A photo of", "Once upon a time"]
    alone = [httpx.post(url + "/v1/completions", json=_raw(t, [], max_tokens=5, n=2), timeout=60).json()
             for t in texts]
    ids = [engine.processor.token_ids(t) for t in texts]
    for prompt in (texts, ids):
        reply = httpx.post(url + "/v1/completions", json=_raw(prompt, [], max_tokens=5, n=2), timeout=60).json()
        assert [c["index"] for c in reply["choices"]] == list(range(6))
        for k, single in enumerate(alone):
            for j in range(2):
                assert reply["choices"][k * 2 + j]["text"] == single["choices"][j]["text"]
        assert reply["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
        assert reply["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)


def test_a_list_of_prompts_with_media_scores_each_as_alone(served):
    """Several continuations of one image prompt in one request (the list shares `media`): each choice's echoed
    log-probabilities are those of its prompt sent alone; the later prompts take the shared prompt from the prefix
    cache that the first one filled."""
    engine, url = served
    media = [random_image(1), random_image(70)]
    prompt = engine.processor.encode_prompt(SHOT + QUERY, media)[0]
    endings = [engine.processor.token_ids(e, special_tokens=False) for e in (" a red circle.", " a cat", " blue")]
    together = httpx.post(url + "/v1/completions", timeout=60, json=_raw([prompt + e for e in endings], media,
                                                                         max_tokens=0, echo=True, logprobs=0)).json()
    assert together["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    for k, ending in enumerate(endings):
        alone = httpx.post(url + "/v1/completions", timeout=60, json=_raw(prompt + ending, media, max_tokens=0,
                                                                          echo=True, logprobs=0)).json()
        lp = together["choices"][k]["logprobs"]["token_logprobs"]
        assert together["choices"][k]["index"] == k and len(lp) == len(prompt) + len(ending)
        assert lp[1:] == pytest.approx(alone["choices"][0]["logprobs"]["token_logprobs"][1:], abs=ATOL)


def test_token_id_prompt_with_media_equals_the_text_prompt(served):
    engine, url = served
    media = [random_image(1), random_image(50)]
    prompt = SHOT + QUERY
    ids = engine.processor.encode_prompt(prompt, media)[0]
    by_text = httpx.post(url + "/v1/completions", json=_raw(prompt, media, max_tokens=6, logprobs=1, echo=True),
                         timeout=60).json()["choices"][0]
    by_ids = httpx.post(url + "/v1/completions", json=_raw(ids, media, max_tokens=6, logprobs=1, echo=True),
                        timeout=60).json()["choices"][0]
    assert by_ids["logprobs"]["tokens"] == by_text["logprobs"]["tokens"]
    assert by_ids["logprobs"]["token_logprobs"][1:] == pytest.approx(by_text["logprobs"]["token_logprobs"][1:],
                                                                     abs=ATOL)
    echoed = engine.processor.decode(ids, skip_special_tokens=False)
    assert by_ids["text"] == echoed + by_text["text"][len(prompt):]


@pytest.mark.parametrize("body,says", [
    ({"prompt": [1, 2, 99999]}, "token ids must be in"),
    ({"prompt": []}, "empty"),
    ({"prompt": [[1, 2], []]}, "empty"),
    ({"prompt": ["a", 1]}, "prompt"),
])
def test_bad_prompt_lists_get_a_clear_400(served, body, says):
    _, url = served
    response = httpx.post(url + "/v1/completions", json={"max_tokens": 2, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]["message"]


def test_token_ids_must_match_the_media(served):
    engine, url = served
    ids = engine.processor.encode_prompt(QUERY, [random_image(1)])[0]
    response = httpx.post(url + "/v1/completions", json=_raw(ids, [random_image(1)] * 2, max_tokens=2), timeout=60)
    assert response.status_code == 400 and "<image> token" in response.json()["error"]["message"]


def test_text_offsets_index_the_echoed_text_with_a_tokenizer_that_adds_a_bos(one_thread):
    """A tokenizer that puts a BOS before every prompt (Llama's, IDEFICS's): the BOS is listed first (its
    log-probability None) at offset 0 and counts no characters, so that each token's `text_offset` is where its text
    starts in the choice's text, the echoed prompt's and the answer's (before: all shifted by the BOS's name)."""
    model, processor = tiny_flamingo("llama", "clip", gates=0.5, lm_overrides=SHARP["llama"])
    tok = processor.tokenizer
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                                  special_tokens=[(tok.bos_token, tok.bos_token_id)])
    prompt = "Output: a red circle"
    assert processor.prompt_ids(prompt)[0] == tok.bos_token_id
    with running_server(Engine(model, processor, max_batch=2), ServeSettings(model_name="tiny")) as url:
        for max_tokens in (0, 3):
            body = {"prompt": prompt, "max_tokens": max_tokens, "echo": True, "logprobs": 1, "temperature": 0}
            choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
            text, lp = choice["text"], choice["logprobs"]
            assert lp["tokens"][0] == tok.bos_token and lp["text_offset"][0] == 0
            prompt_tokens = len(processor.prompt_ids(prompt))
            assert "".join(lp["tokens"][1:prompt_tokens]) == prompt
            for token, offset in list(zip(lp["tokens"], lp["text_offset"]))[1:]:
                if "\ufffd" not in token and token != "<|endofchunk|>":  # a part of a character; a stop token
                    assert text[offset:offset + len(token)] == token, (token, offset, text)
            assert lp["text_offset"][prompt_tokens:prompt_tokens + 1] == ([len(prompt)] if max_tokens else [])


def test_generated_reference_tokens_stay_in_the_text(one_thread):
    """A model with image references may name an image in its answer (`<image1>`): the answer's text keeps the token,
    as its logprobs' `tokens` do (so `text_offset` indexes the text), in a stream's deltas and in chat content; the
    other control tokens (EOS, pad, `<|endofchunk|>`) stay out of the text."""
    model, processor = tiny_flamingo("llama", "clip", gates=0.5, num_image_references=4, lm_overrides=SHARP["llama"])
    processor.image_references = True
    tok, (first, _) = processor.tokenizer, model.references
    engine = Engine(model, processor, max_batch=2)
    red = tok.encode(" red", add_special_tokens=False)
    controls = [tok.pad_token_id, model.config.end_of_chunk_token_id, tok.eos_token_id]
    assert processor.decode([*red, first + 1, *controls, *red, first]) == " red<image1> red<image0>"
    assert processor.decode([*red, *controls, *red]) == tok.decode([*red, *controls, *red], skip_special_tokens=True)
    prompt, media = "Image 0 is <image0>. Image 1 is <image1>. Which? Answer:", [random_image(1), random_image(2)]
    force = {str(first + 1): 100}
    with running_server(engine, ServeSettings(model_name="tiny")) as url:
        body = _raw(prompt, media, max_tokens=3, logprobs=0, logit_bias=force)
        choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert choice["text"] == "<image1>" * 3
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"] == [0, 8, 16]
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(media[0])}},
                                                 {"type": "text", "text": "Which?"}]}]
        reply = openai_client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                                           temperature=0, logit_bias=force, logprobs=True)
        assert reply.choices[0].message.content == "<image1><image1>"
        assert [e.token for e in reply.choices[0].logprobs.content] == ["<image1>"] * 2


def test_a_token_never_chosen_still_shows_in_top_logprobs(one_thread):
    """`top_logprobs` are the model's own, as the chosen token's are (a log-softmax of its raw logits: vLLM's default
    `raw_logprobs`, and what a harness's HF backend reads): `<image>`, which the sampler never chooses, is listed
    where the model ranks it, and the chosen token's log-probability is not renormalised without it."""
    model, processor = tiny_flamingo("llama", "clip", gates=0.5, seed=0, lm_overrides=SHARP["llama"])
    engine = Engine(model, processor, max_batch=2, prefill_chunk=16)
    (image,) = engine.suppress
    assert image == processor.tokenizer.convert_tokens_to_ids("<image>")
    prompt, media = SHOT + QUERY, [random_image(1), random_image(21)]
    first, second = _forward_logprobs(engine, prompt, media)[0][-1].topk(2).indices.tolist()
    rows = model.lm.get_output_embeddings().weight
    with torch.no_grad():  # `<image>` (an added token: its head row is Flamingo's) the likeliest next token, its
        # logit the first's plus the first's margin over the second
        model.new_lm_head[image - model.config.first_new_token_id] = 2 * rows[first] - rows[second]
    reference = _forward_logprobs(engine, prompt, media)[0][-1]
    assert int(reference.argmax()) == image
    engine.start()
    try:
        tokens, events = _run_job(engine, prompt, media, SamplingParams(1, temperature=0.0, logprobs=3))
    finally:
        engine.stop(0.0)
    (found,) = [e.logprobs for e in events if e.kind == "delta" and e.logprobs is not None]
    chosen = tokens[0]
    assert chosen != image and chosen == int(reference.masked_fill(torch.arange(len(reference)) == image,
                                                                   -float("inf")).argmax())
    assert found.top_ids[0].tolist() == reference.topk(3).indices.tolist() and found.top_ids[0, 0] == image
    assert torch.allclose(found.logprobs[0], reference[chosen], atol=ATOL)
    assert torch.allclose(found.top_logprobs[0], reference.topk(3).values, atol=ATOL)
