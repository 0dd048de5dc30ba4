"""argparse types every command shares (`flamingo`, `flamingo data`, `flamingo eval`): a bad value is refused by the
parser in one line naming the option, before any work."""

from __future__ import annotations

import argparse
import math
from typing import Any


def _parsed(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def _int_at_least(text: str, least: int) -> int:
    value = _parsed(text, int, "an integer")
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a size or count of 0 would give a server or run that never works)."""
    return _int_at_least(text, 1)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a size or time limit of 0 or less refuses every request)."""
    value = _parsed(text, float, "a number")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (a cache size; 0: the cache off)."""
    value = _parsed(text, float, "a number")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (0: the feature off)."""
    return _int_at_least(text, 0)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    value = _parsed(text, int, "an integer")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535 (0: any free one), got {value}")
    return value


def host_name(text: str) -> str:
    """An argparse type: `--host`, never empty (what `--host "$HOST"` passes with the variable unset), which the
    server would read as every interface."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names no interface (empty, it would bind every one): name it, "
                                         "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
    return text


def allowed_host(text: str) -> str:
    """An argparse type: `--allowed-host`, a host name (what `--allowed-host "$NAME"` passes with the variable unset,
    empty, would make the server answer every request 403)."""
    if not text.strip() or any(c.isspace() or c in "/@" for c in text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name: give the name clients (or a proxy) send as "
                                         "the Host, e.g. flamingo.example.org")
    return text.strip()


def non_empty_key(text: str) -> str:
    """An argparse type: `--api-key`, never empty or blank (what `--api-key "$KEY"` passes with the variable unset):
    an empty key must not mean a server without authentication."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is an empty key: give the key, or leave out --api-key to serve "
                                         "without one")
    return text


def finite_float(text: str) -> float:
    """An argparse type: a finite number (NaN would compare false with everything: a length penalty, a rank)."""
    value = _parsed(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
