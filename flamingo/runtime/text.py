"""Text read from files people write: valid Unicode before a tokenizer sees it."""

from __future__ import annotations

import re

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (half an emoji cut by a scraper: valid JSON, not valid Unicode) replaced
    by U+FFFD, one character for one, so character spans (a conversation's answers) keep their place. Tokenizers take
    valid UTF-8 only, and a tar caption's broken bytes are decoded to U+FFFD the same way."""
    return LONE_SURROGATE.sub("\ufffd", text)

