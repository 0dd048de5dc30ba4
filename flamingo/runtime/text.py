"""Text read from files people write: valid Unicode before a tokenizer sees it."""

from __future__ import annotations

import codecs
import re

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (half an emoji cut by a scraper: valid JSON, not valid Unicode) replaced
    by U+FFFD, one character for one, so character spans (a conversation's answers) keep their place. Tokenizers take
    valid UTF-8 only, and a tar caption's broken bytes are decoded to U+FFFD the same way."""
    return LONE_SURROGATE.sub("\ufffd", text)



# Byte-order marks -> the codec that reads them (and drops the mark); UTF-32's before UTF-16's, whose LE mark begins
# UTF-32 LE's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def bom_codec(head: bytes, default: str) -> str:
    """The codec the byte-order mark `head` starts with announces (UTF-8's, UTF-16's or UTF-32's), else `default`."""
    return next((name for bom, name in _BOMS if head.startswith(bom)), default)


def file_encoding(path: str) -> str:
    """The codec that reads the text file (a table, a batch input file) at `path`: the UTF-16 or UTF-32 its
    byte-order mark announces (Notepad's "Unicode", Excel's "Unicode Text"), else UTF-8, a byte-order mark dropped."""
    with open(path, "rb") as f:
        return bom_codec(f.read(4), "utf-8-sig")
