"""An answer's text as its tokens come, decoded at a cost per token that does not grow with the answer.

Decoding the whole continuation at every step costs O(n) per token, O(n^2) per answer, per row and on the engine's
thread, between decode steps. `IncrementalText` decodes a short window instead, as vLLM's and TGI's detokenizers do:
the text a new token adds is `decode(window + [token])` minus `decode(window)`, where the window starts at the token
before the last emitted ones, so a tokenizer's context-dependent decoding (a SentencePiece word's leading space,
which it strips at the start of a text, and bytes joined into one character) sees the same neighbours the whole
decode does. Tokens that leave an incomplete UTF-8 character (their decode ends in U+FFFD) stay in the window until the
character completes, or until `flush` (the answer ends: the U+FFFD stays, as the whole decode writes it); meanwhile
`text` ends in that U+FFFD, as the whole decode's does (the engine holds it back). A run of such tokens (a byte
token repeated) settles all but its last few where that splits no character, so the window stays short. The text is
the whole decode's (tested), except where a SentencePiece byte-fallback tokenizer's whole decode turns a run of byte
tokens into one U+FFFD per byte because the run ends in a broken character: the run's complete characters were sent
and stay. The tokens the processor's `decode` leaves out (control tokens: `hidden_ids`) never enter the window;
reference tokens `<imageK>` do.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what decoding writes for a truncated UTF-8 sequence
# A run of tokens that keeps ending in a broken character (a byte token repeated) settles all but its last KEEP
# tokens once more than MAX_PENDING wait: a character is at most 4 bytes, so the bytes before the last 4 tokens are
# final, and the window (the cost of a token) stays bounded
MAX_PENDING, KEEP = 8, 4


class IncrementalText:
    """The text of an answer's tokens so far (`text`): what the whole `processor.decode(tokens)` writes (tested), with
    the space a SentencePiece decoder strips from a text's first word kept; its last characters possibly U+FFFD for
    a character still incomplete; after `flush`, final."""

    def __init__(self, processor: Any) -> None:
        self._decode = processor.decode
        self._hidden = processor.hidden_ids
        # the answer's shown tokens after one context token (a newline's), so that its first token reads as in the
        # middle of a text: a SentencePiece decoder strips the leading space of a text's first word ("▁a" -> "a"),
        # and a completion continues its prompt (" a" after "Q: x"); serve/logprobs.py spells tokens the same way
        self._ids: list[int] = processor.tokenizer.encode("\n", add_special_tokens=False)[-1:]
        self._start = 0  # the window's first token: context for the tokens after `_read`
        self._read = len(self._ids)  # the tokens before it have their text in `_settled`
        self._settled = ""
        self.text = ""  # `_settled` and the text of the tokens after `_read`

    def add(self, token: int) -> None:
        """Take one token (a hidden one changes nothing)."""
        if token not in self._hidden:
            self._ids.append(token)
            self._advance(final=False)

    def flush(self) -> None:
        """The answer ends: a character left incomplete stays U+FFFD, as the whole decode writes it."""
        self._advance(final=True)

    def _advance(self, final: bool) -> None:
        before = self._decode(self._ids[self._start:self._read])
        after = self._decode(self._ids[self._start:])
        # the pending tokens' text: the window's past what it wrote before, or, where the window no longer begins as
        # it did, the new tokens' alone (SentencePiece's byte fallback writes one U+FFFD per byte for a run of byte
        # tokens that is not valid UTF-8 as a whole, so a sent character and a broken one after it decode to U+FFFDs
        # together); `shown[:sent]` is the part already in `_settled`, decoded from the window's token `first`
        if after.startswith(before):
            shown, sent, first = after, len(before), self._start
        else:
            shown, sent, first = self._decode(self._ids[self._read:]), 0, self._read
        self.text = self._settled + shown[sent:]
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self._settled = self.text
            self._start, self._read = self._read, len(self._ids)
        elif len(self._ids) - self._read > MAX_PENDING:  # a run of broken characters: settle all but its last tokens
            cut = len(self._ids) - KEEP
            head = self._decode(self._ids[first:cut])
            if head.startswith(shown[:sent]) and shown.startswith(head):  # the cut splits no character
                self._settled += head[sent:]
                self._start, self._read = self._read, cut
