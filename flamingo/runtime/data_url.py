"""`data:` URLs (RFC 2397): media carried inline, as OpenAI chat messages carry images (`data:image/png;base64,...`).
The server reads them from requests (serve/media.py) and training reads them from chat rows (data/chat.py)."""

from __future__ import annotations

import base64
import re
import urllib.parse

# WHATWG: the part before the comma stripped of ASCII whitespace (so is the media type's end); `;`, any spaces,
# `base64` (any case) at its end: the data is base64
_DATA_URL = re.compile(r"^data:[\t\n\f\r ]*(?P<mime>[\w.+-]+/[\w.+-]+)?[\t\n\f\r ]*(?P<params>(;[^;,]*)*?)"
                       r"(?P<b64>; *base64[\t\n\f\r ]*)?,", re.I)
_B64_SPACE = re.compile(r"[\t\n\f\r ]+")  # ASCII whitespace (WHATWG's)
_B64_JUNK = re.compile(r"[^A-Za-z0-9+/]")
MALFORMED = "malformed data URL (expected data:<mime>;base64,<data>)"
# 64 or more base64 characters (48 bytes; a 1x1 GIF takes 60), maybe line-wrapped, and nothing else
_BARE_B64 = re.compile(r"[\t\n\f\r ]*(?:[A-Za-z0-9+/][\t\n\f\r ]*){64,}={0,2}[\t\n\f\r ]*")
BARE_BASE64 = "bare base64 is not a URL: a data URL needs `data:<media type>;base64,` before it " \
              "(data:image/png;base64,iVBOR...)"


def is_data_url(url: str) -> bool:
    """Whether `url` is a data URL (schemes are case-insensitive, RFC 3986 3.1: `DATA:` is one too)."""
    return url[:5].lower() == "data:"


def is_bare_base64(text: str) -> bool:
    """Whether `text` reads as media data sent in base64 without its data URL's head. A path may read so too (a long
    name of letters and digits alone): ask once it names no file."""
    return _BARE_B64.fullmatch(text) is not None


def decode_data_url(url: str) -> tuple[str, bytes]:
    """A data URL -> (its media type, lower-cased, "" when it names none; its bytes). ValueError: malformed, or its
    base64 does not decode."""
    m = _DATA_URL.match(url)
    if m is None:
        raise ValueError(MALFORMED)
    payload = url[m.end():]
    data = _forgiving_b64decode(payload) if m["b64"] else urllib.parse.unquote_to_bytes(payload)
    return (m["mime"] or "").lower(), data


def _forgiving_b64decode(payload: str) -> bytes:
    """Base64 as browsers read a data URL's (WHATWG's data: URL processor, then forgiving-base64): percent-escapes
    decoded (`%2B` is `+`), ASCII whitespace dropped (line-wrapped output of GNU `base64` or `base64.encodebytes`),
    one or two `=` at the end of a length that is a multiple of 4 dropped, padding optional; any other character
    outside the alphabet (an `=` elsewhere too) is a ValueError that names it."""
    text = _B64_SPACE.sub("", urllib.parse.unquote(payload, encoding="latin-1"))
    if len(text) % 4 == 0 and text.endswith("="):
        text = text[:-2] if text.endswith("==") else text[:-1]
    bad = _B64_JUNK.search(text)
    if bad is not None:
        raise ValueError(f"the data URL's base64 does not decode: it holds {bad[0]!r}, which is not base64"
                         + (" there" if bad[0] == "=" else ""))
    if len(text) % 4 == 1:
        raise ValueError("the data URL's base64 does not decode: its length is not a base64 length (cut short?)")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def media_kind(mime: str) -> str:
    """"image" or "video" for a medium's type; ValueError for any other (a data URL must carry one of them)."""
    if mime.startswith("image/") or mime.startswith("video/"):
        return mime.split("/")[0]
    if not mime:  # `data:;base64,...` (RFC 2397 reads it as text/plain)
        raise ValueError("unsupported media type: the data URL names none (give image/* or video/*, e.g. "
                         "data:image/png;base64,...)")
    raise ValueError(f"unsupported media type {mime!r} (image/* or video/*)")
