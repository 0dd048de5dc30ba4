"""Incremental detokenization (flamingo/detokenize.py): the text built token by token is the whole decode's, for
byte-level BPE and SentencePiece-style byte-fallback tokenizers, with characters split over tokens, control tokens
left out and reference tokens kept."""

from __future__ import annotations

import random

import pytest
from test_serve_logprobs import _byte_fallback_tokenizer

from flamingo import detokenize
from flamingo.detokenize import IncrementalText
from flamingo.processing import FlamingoProcessor, add_flamingo_tokens
from flamingo.tiny import tiny_tokenizer

TEXTS = ["naïve café 🦩 — ok", "Output: 中文 and more", "😀 a", "a 中文 caf", "plain words, only.\n  two  spaces"]


class _Plain:
    """A processor-like decode over a bare tokenizer (nothing hidden)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.hidden_ids = tokenizer, frozenset()

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _streamed(processor, ids: list[int], whole=None) -> str:
    """The flushed text of `ids` added one by one; with `whole` (a decode), every step's text must be its decode of
    the tokens so far."""
    text = IncrementalText(processor)
    for i, token in enumerate(ids):
        text.add(token)
        if whole is not None:
            assert text.text == whole(ids[:i + 1]), (ids, i)
    text.flush()
    return text.text


def _whole(tokenizer):
    """The whole decode of an answer's ids in the middle of a text (after a newline token): a SentencePiece
    decoder's leading-space strip applies to the newline, not to the answer's first word."""
    anchor = tokenizer.encode("\n", add_special_tokens=False)[-1:]
    lead = len(tokenizer.decode(anchor, skip_special_tokens=False))
    return lambda ids: tokenizer.decode(anchor + list(ids), skip_special_tokens=False)[lead:]


@pytest.mark.parametrize("make", [tiny_tokenizer, _byte_fallback_tokenizer], ids=["byte-level", "byte-fallback"])
@pytest.mark.parametrize("text", TEXTS)
def test_every_steps_text_is_the_whole_decode(make, text):
    """Byte-level BPE: every step's text too. Byte fallback: the answer's; mid-answer, a run of byte tokens whose
    last character is still incomplete decodes whole as one U+FFFD per byte, and the run's complete characters
    already read (`中` in `中` + half of `文`) stay."""
    tokenizer = make()
    ids = tokenizer.encode(text, add_special_tokens=False)
    every_step = _whole(tokenizer) if make is tiny_tokenizer else None
    assert _streamed(_Plain(tokenizer), ids, every_step) == _whole(tokenizer)(ids)


def test_random_ids_of_a_byte_level_tokenizer_decode_as_the_whole():
    """Any ids (truncated and broken characters in the middle and at the end): each step's text and the flushed
    text are the whole decode's."""
    tokenizer = tiny_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        assert _streamed(_Plain(tokenizer), ids, _whole(tokenizer)) == _whole(tokenizer)(ids)


def test_random_texts_of_a_byte_fallback_tokenizer_decode_as_the_whole():
    tokenizer = _byte_fallback_tokenizer()
    rng = random.Random(0)
    pool = list("abcef aé中文🦩 \n")
    for _ in range(200):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 20)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert _streamed(_Plain(tokenizer), ids) == _whole(tokenizer)(ids), text


def _broken(tokenizer) -> list[int]:
    """The ids that decode alone to one U+FFFD (a UTF-8 lead or continuation byte)."""
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i], skip_special_tokens=False) == "\ufffd"]


@pytest.mark.parametrize("make", [tiny_tokenizer, _byte_fallback_tokenizer], ids=["byte-level", "byte-fallback"])
def test_a_long_run_of_broken_bytes_keeps_the_window_short(make):
    """A byte token repeated (a degenerate model, a client's logit_bias) never completes a character: the window
    still stays a few tokens long, so a token's cost does not grow with the answer."""
    tokenizer = make()
    byte = _broken(tokenizer)[-1]
    text = IncrementalText(_Plain(tokenizer))
    for _ in range(4000):
        text.add(byte)
        assert len(text._ids) - text._start < 32
    text.flush()
    assert text.text == "\ufffd" * 4000


def _steps(processor, ids: list[int]) -> list[str]:
    """The text after each token added, then after the flush."""
    text = IncrementalText(processor)
    steps = []
    for token in ids:
        text.add(token)
        steps.append(text.text)
    text.flush()
    return steps + [text.text]


@pytest.mark.parametrize("make", [tiny_tokenizer, _byte_fallback_tokenizer], ids=["byte-level", "byte-fallback"])
def test_runs_of_broken_bytes_between_characters_give_every_steps_text_as_an_unbounded_window(make, monkeypatch):
    """Good text (characters split over byte tokens) between runs of broken bytes (one repeated, or mixed lead and
    continuation bytes): settling a long run's head changes no step's text. Byte-level BPE: every step's text is the
    whole decode's; byte fallback: the text an unbounded window gives (its documented difference, unchanged)."""
    tokenizer = make()
    good = tokenizer.encode("naïve café 🦩 中文 ok ", add_special_tokens=False)
    broken = _broken(tokenizer)
    whole = _whole(tokenizer)
    for seed in range(12):
        rng = random.Random(seed)
        ids: list[int] = []
        for _ in range(30):
            kind = rng.randrange(3)
            if kind == 0:
                ids += good[rng.randrange(len(good)):][:rng.randrange(1, len(good))]
            elif kind == 1:
                ids += [rng.choice(broken)] * rng.randrange(1, 30)
            else:
                ids += [rng.choice(broken) for _ in range(rng.randrange(1, 30))]
        steps = _steps(_Plain(tokenizer), ids)
        if make is tiny_tokenizer:
            assert steps == [whole(ids[:i + 1]) for i in range(len(ids))] + [whole(ids)], seed
        with monkeypatch.context() as m:
            m.setattr(detokenize, "MAX_PENDING", len(ids) + 1)
            assert steps == _steps(_Plain(tokenizer), ids), seed


def test_a_byte_fallback_answer_ending_mid_character_keeps_its_whole_characters():
    """SentencePiece's byte fallback writes one U+FFFD per byte for a run of byte tokens that is not valid UTF-8 as a
    whole; the answer's complete characters were sent before its last character was cut, and stay."""
    tokenizer = _byte_fallback_tokenizer()
    ids = tokenizer.encode("a中", add_special_tokens=False) + tokenizer.encode("文", add_special_tokens=False)[1:3]
    assert tokenizer.decode(ids[1:], skip_special_tokens=False) == "\ufffd" * 5
    assert _streamed(_Plain(tokenizer), ids[1:]) == "中\ufffd\ufffd"


def test_an_answers_first_word_keeps_the_space_a_sentencepiece_decoder_strips_at_a_texts_start():
    """`▁a b` decodes alone as "a b": a completion continues its prompt ("Q: x" + " a b"), and the logprobs spell
    its first token " a"; the answer's text keeps the space."""
    tokenizer = _byte_fallback_tokenizer()
    ids = tokenizer.encode("a b", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "a b"
    assert _streamed(_Plain(tokenizer), ids) == " a b"


def test_control_tokens_are_left_out_and_references_kept():
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok, num_references=2)
    processor = FlamingoProcessor(tok, None)
    ids = (tok.encode("Look at", add_special_tokens=False) + [tok.convert_tokens_to_ids("<image1>")]
           + tok.encode(" then 🦩", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|endofchunk|>")]
           + tok.encode(" end", add_special_tokens=False))
    streamed = _streamed(processor, ids, processor.decode)
    assert streamed == processor.decode(ids) and "<image1>" in streamed and "endofchunk" not in streamed
