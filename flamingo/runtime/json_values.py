"""Values written as JSON lines (metrics, bench results), where a measurement may be NaN or infinite."""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float, however deep in dicts and lists, as None (JSON's null): JSON has no
    NaN (json.dumps would write `NaN`, which strict parsers such as jq and JavaScript's refuse); a value that does not
    apply (a skipped step's loss, peak CUDA memory on a CPU) reads as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
