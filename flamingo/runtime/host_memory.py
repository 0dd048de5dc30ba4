"""The process's resident memory as Linux reports it (/proc/self/status), for logs and the CPU memory bench."""

from __future__ import annotations

from typing import Optional


def status_kib(field: str) -> Optional[int]:
    """A /proc/self/status field in KiB (`VmRSS`, `VmHWM`: the resident set and its high-water mark); None where the
    file or the field is missing (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return None
