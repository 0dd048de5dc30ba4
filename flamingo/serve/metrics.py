"""The server's metrics in Prometheus' text format (`GET /metrics`), without a client library.

Counters: requests by endpoint and status, streams that failed after their status went out, prompt (and
prefix-cached) and generated tokens. Gauges: requests waiting, rows decoding, prefix cache bytes, vision cache bytes.
Counters of frames brought to the vision tower and of those it ran on.
Histograms: rows per decode step, time to first token, time between a row's tokens. All names start `flamingo_`.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Optional

_HELP = {
    "requests_total": ("counter", "HTTP requests to the generation endpoints, by endpoint and status code"),
    "stream_errors_total": ("counter", "streams that failed after their 200 went out (an error event, or cut), "
                                       "by endpoint"),
    "prompt_tokens_total": ("counter", "prompt tokens prefilled"),
    "prompt_tokens_cached_total": ("counter", "prompt tokens whose prefill came from the prefix cache"),
    "generation_tokens_total": ("counter", "tokens generated"),
    "prefill_calls_shared_total": ("counter", "LM calls that prefilled several prompts together"),
    "prefill_prompts_shared_total": ("counter", "prompts prefilled in those calls"),
    "queue_depth": ("gauge", "requests waiting for a batch row"),
    "running_rows": ("gauge", "rows in the decode batch"),
    "prefix_cache_bytes": ("gauge", "bytes held by the prefix cache"),
    "vision_frames_total": ("counter", "frames that reached the vision stage (not those of prefix-cached blocks)"),
    "vision_frames_computed_total": ("counter", "of those, the frames the tower ran on (the others: the vision cache)"),
    "vision_cache_bytes": ("gauge", "bytes held by the vision feature cache"),
    "batch_size": ("histogram", "rows per decode step"),
    "time_to_first_token_seconds": ("histogram", "from a request's arrival in the queue to its first token"),
    "inter_token_latency_seconds": ("histogram", "between two tokens of one row"),
}
_BUCKETS = {
    "batch_size": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    "time_to_first_token_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "inter_token_latency_seconds": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
}


class Metrics:
    """Thread-safe counters, gauges and histograms (fixed buckets), rendered by `render()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist: dict[str, tuple[list[int], list[float]]] = {
            name: ([0] * (len(b) + 1), [0.0]) for name, b in _BUCKETS.items()}  # bucket counts, [sum]

    def inc(self, name: str, value: float = 1, labels: Optional[dict[str, str]] = None) -> None:
        key = (name, tuple(sorted((labels or {}).items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + value

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._values[(name, ())] = value

    def observe(self, name: str, value: float) -> None:
        counts, total = self._hist[name]
        with self._lock:
            counts[bisect.bisect_left(_BUCKETS[name], value)] += 1
            total[0] += value

    def value(self, name: str, labels: Optional[dict[str, str]] = None) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted((labels or {}).items()))), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in _HELP.items():
                lines += [f"# HELP flamingo_{name} {text}", f"# TYPE flamingo_{name} {kind}"]
                if kind == "histogram":
                    counts, total = self._hist[name]
                    running = 0
                    for bound, count in zip((*_BUCKETS[name], "+Inf"), counts):
                        running += count
                        lines.append(f'flamingo_{name}_bucket{{le="{bound}"}} {running}')
                    lines += [f"flamingo_{name}_sum {_number(total[0])}", f"flamingo_{name}_count {running}"]
                    continue
                series = [(k[1], v) for k, v in self._values.items() if k[0] == name] or [((), 0)]
                for labels, v in sorted(series):
                    label_text = ",".join(f'{k}="{v}"' for k, v in labels)
                    series_name = f"flamingo_{name}{{{label_text}}}" if label_text else f"flamingo_{name}"
                    lines.append(f"{series_name} {_number(v)}")
        return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    """A sample's value, exact: an integral value as an integer (a counter of 1234567 tokens, not `1.23457e+06`), any
    other as the shortest text that reads back as the same double (Prometheus' `rate()` sees every token)."""
    v = float(v)
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    return str(int(v)) if v.is_integer() else repr(v)
