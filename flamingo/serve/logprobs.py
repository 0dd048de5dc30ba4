"""Log-probabilities as OpenAI's API writes them: chat's `logprobs.content` entries and the completions API's
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists.

A token's text is what it adds in the middle of a text (decoded after a newline token, so a SentencePiece word keeps
its leading space), special tokens included; its bytes are that text's UTF-8, except for a token that is part of a
character (its text is "\ufffd"), whose own bytes are given (a byte-fallback `<0xNN>` token, or a byte-level BPE
token), so a client can join them back into the character.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, Optional

from ..model.logprobs import TokenLogprobs

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (the inverse of its `bytes_to_unicode` table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenStrings:
    """Token id -> (text, UTF-8 bytes), cached. hidden: the ids an answer's text leaves out (the processor's
    `hidden_ids`: control tokens), which take no characters of it (`CompletionLogprobs.add`)."""

    def __init__(self, tokenizer: Any, hidden: frozenset[int] = frozenset()) -> None:
        self.tokenizer, self.hidden = tokenizer, hidden
        self._anchor = tokenizer.encode("\n", add_special_tokens=False)[-1:]
        self._anchor_text = self._decode(self._anchor)
        self._byte_level = _byte_level_decoder()
        self._known: dict[int, tuple[str, bytes]] = {}  # at most the vocabulary

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token not in self._known:
            self._known[token] = self._text_and_bytes(token)
        return self._known[token]

    def _text_and_bytes(self, token: int) -> tuple[str, bytes]:
        text = self._decode(self._anchor + [token])
        text = text[len(self._anchor_text):] if text.startswith(self._anchor_text) else self._decode([token])
        if "\ufffd" not in text:
            return text, text.encode()
        raw = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(raw, str):
            byte = _BYTE_TOKEN.fullmatch(raw)
            if byte:
                return text, bytes([int(byte.group(1), 16)])
            if raw and all(c in self._byte_level for c in raw):
                return text, bytes(self._byte_level[c] for c in raw)
        return text, text.encode()


def chat_entries(strings: TokenStrings, tokens: list[int], logprobs: TokenLogprobs) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: one entry per token, each with its `top_logprobs` alternatives."""
    def entry(token: int, lp: float) -> dict[str, Any]:
        text, raw = strings(token)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
            for t, (lp, top) in zip(tokens, logprobs.rows())]


def _inserted_into(spelled: str, text: str) -> Optional[list[int]]:
    """Where each position of `spelled` (and its end) is in `text`, when `spelled` is `text` with characters put in
    (a legacy SentencePiece tokenizer writes a `▁` after each special token, which the prompt's text does not hold):
    a put-in character takes none of the text. Aligned greedily; None when `text` is not so contained."""
    at, j = [], 0
    for char in spelled:
        at.append(j)
        if j < len(text) and char == text[j]:
            j += 1
    at.append(j)
    return at if j == len(text) else None


class CompletionLogprobs:
    """The completions API's `logprobs` object of one choice, built token by token. `text_offset` is where each token
    starts in the choice's `text` (the echoed prompt, then the answer), in characters: the characters the tokens
    before it complete (from `offset`), counted from their bytes, so that a character split over several tokens
    (each reading "\ufffd") counts once and each of those tokens is at the character's start; tokens the prompt's
    text does not hold count none (`add_prompt`)."""

    def __init__(self, strings: TokenStrings, offset: int = 0) -> None:
        self.strings, self.offset = strings, offset
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds back a character's first bytes
        self.body: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, tokens: list[int], logprobs: Optional[TokenLogprobs]) -> dict[str, list[Any]]:
        """Append tokens (T,) with their log-probabilities (None: the first token of a prompt, which has none);
        returns the lists of just these tokens (a stream's chunk)."""
        return self._add(tokens, logprobs, self.strings.hidden)[0]

    def _add(self, tokens: list[int], logprobs: Optional[TokenLogprobs], hidden: frozenset[int] = frozenset()
             ) -> tuple[dict[str, list[Any]], str]:
        """`add`, and the text the tokens complete; `hidden` tokens (an answer's control tokens, which its text
        leaves out) are listed at the current offset and take no characters."""
        rows = logprobs.rows() if logprobs is not None else [(None, None)] * len(tokens)
        part: dict[str, list[Any]] = {k: [] for k in self.body}
        spelled: list[str] = []
        for token, (lp, top) in zip(tokens, rows):
            text, raw = self.strings(token)
            part["tokens"].append(text)
            part["token_logprobs"].append(lp)
            part["top_logprobs"].append(None if top is None else self._alternatives(text, lp, top))
            offset, chars = (self.offset, "") if token in hidden else self._feed(raw)
            part["text_offset"].append(offset)
            spelled.append(chars)
        for key, values in part.items():
            self.body[key].extend(values)
        return part, "".join(spelled)

    def _feed(self, raw: bytes) -> tuple[int, str]:
        """A token's bytes -> (its offset: where the character its first byte is in starts, the characters its bytes
        complete). A first byte that breaks an unfinished character puts that character's U+FFFD before it (the text
        holds one there too)."""
        if not raw:
            return self.offset, ""
        first = self._utf8.decode(raw[:1])
        held = bool(self._utf8.getstate()[0])  # the first byte waits for the rest of its character
        offset = self.offset + len(first) - (0 if held else 1)
        chars = first + self._utf8.decode(raw[1:])
        self.offset += len(chars)
        return offset, chars

    def add_prompt(self, tokens: list[int], logprobs: Optional[TokenLogprobs], text: str) -> dict[str, list[Any]]:
        """The echoed prompt's tokens (T,) (the first has no log-probability; `logprobs` are the others') with
        offsets into `text`, the prompt as echoed. Tokens the tokenizer puts before that text (a BOS, and the space a
        SentencePiece tokenizer writes before the first word) are in the lists but at offset 0 and count no
        characters, so that the answer's tokens start at `len(text)`. Returns the lists of these tokens."""
        start = self.offset
        (first, spelled), (rest, more) = self._add(tokens[:1], None), self._add(tokens[1:], logprobs)
        part = {k: first[k] + rest[k] for k in first}
        spelled += more
        extra = len(spelled) - len(text)
        if extra > 0 and spelled.endswith(text):
            part["text_offset"] = [start + max(0, o - start - extra) for o in part["text_offset"]]
        elif extra > 0 and (at := _inserted_into(spelled, text)) is not None:  # a `▁` after each special token
            part["text_offset"] = [start + at[o - start] for o in part["text_offset"]]
        elif extra == 0:  # the tokens spell the text (or another as long): counted as is
            return part
        else:  # another text (a `▁` the prompt holds reads as a space): within it, the answer after it
            part["text_offset"] = [min(o, start + len(text)) for o in part["text_offset"]]
        self.body["text_offset"][-len(tokens):] = part["text_offset"]
        self.offset -= extra
        return part

    def _alternatives(self, text: str, lp: float, top: list[tuple[int, float]]) -> dict[str, float]:
        """A position's `top_logprobs` by text: the token there (`text`, log-probability `lp`) first, as OpenAI's
        always holds it (up to `logprobs` + 1 entries), so its own value holds its text's key; then its alternatives,
        the likeliest of those with one text (byte tokens all read "\ufffd"; ids the tokenizer has no token for, "")."""
        out = {text: lp}
        for token, value in top:
            out.setdefault(self.strings(token)[0], value)
        return out
