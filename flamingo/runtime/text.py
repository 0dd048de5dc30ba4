"""Text read from files people write: valid Unicode before a tokenizer sees it."""

from __future__ import annotations

import re
from typing import Any

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (half an emoji cut by a scraper: valid JSON, not valid Unicode) replaced
    by U+FFFD, one character for one, so character spans (a conversation's answers) keep their place. Tokenizers take
    valid UTF-8 only, and a tar caption's broken bytes are decoded to U+FFFD the same way."""
    return LONE_SURROGATE.sub("\ufffd", text)


def valid_strings(value: Any) -> Any:
    """Parsed JSON with `valid_text` applied to every string in it, keys included, however deep."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [valid_strings(v) for v in value]
    if isinstance(value, dict):
        return {valid_strings(k): valid_strings(v) for k, v in value.items()}
    return value
