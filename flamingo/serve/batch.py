"""`flamingo batch`: a file of requests in OpenAI's Batch API format, answered offline by the server's own endpoints.

Input: JSONL, one request per line, as OpenAI's Batch API (and vLLM's `run_batch`) take them; output: JSONL in input
order, OpenAI's batch output entries (serve/batch_lines.py has both formats and the checks of a line). A request the
endpoint refuses keeps its status code and error body (400 for a bad image, ...); a line that is no request gets
`response: null` and an `error`. The run never stops on one bad line.

The requests go through the app `flamingo serve` runs (its checks, chat format, media policy and answers), in this
process and `concurrency` at a time, so that the engine batches them as it would concurrent clients; a queue-full
answer (429) is retried.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..runtime.checkpoint_io import atomic_file
from .app import ServeSettings, create_app
from .batch_lines import Answer, Line, app_client, entry, parse_lines, read_lines, send_all, tokens_of
from .engine import Engine


@dataclass
class BatchReport:
    requests: int = 0  # lines read
    succeeded: int = 0  # answered with status 200
    failed: dict[int, int] = field(default_factory=dict)  # status code -> requests the endpoint refused
    invalid: int = 0  # lines that are no request (error, no response)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "succeeded": self.succeeded,
                "failed": {str(k): v for k, v in sorted(self.failed.items())}, "invalid": self.invalid,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "seconds": round(self.seconds, 3),
                "completion_tokens_per_s": round(self.completion_tokens / self.seconds, 2) if self.seconds else None}


async def _run(engine: Engine, settings: ServeSettings, lines: list[Line], concurrency: int,
               progress: bool, input_path: str) -> list[Optional[Answer]]:
    from tqdm.auto import tqdm

    with tqdm(total=sum(line.request is not None for line in lines), desc="batch", unit="req",  # closed on errors
              disable=not progress) as bar:
        async with app_client(create_app(engine, settings), settings.api_key) as client:
            return await send_all(client, lines, concurrency, on_answer=lambda k, answer: bar.update(1),
                                  batch=repr(input_path))  # the log line of a line that fails to send names it


def run_batch(engine: Engine, settings: ServeSettings, input_path: str, output_path: str, *,
              concurrency: Optional[int] = None, progress: bool = True) -> BatchReport:
    """Answer every request of `input_path` into `output_path` (written whole, then renamed into place). The engine
    is started here and stopped at the end (one that was stopped is refused). concurrency: requests in flight
    (default: twice the engine's batch, within its queue)."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 (or unset: twice the engine's batch), got {concurrency}")
    if not engine.accepting:  # else every line would be answered 503, and the output written as if answered
        raise ValueError("the engine was stopped (an earlier run_batch stops it at its end, and an engine runs once): "
                         "build another one for this batch")
    report = BatchReport()
    lines = parse_lines(read_lines(input_path))  # as the HTTP Batch API reads a file
    report.requests = len(lines)
    concurrency = concurrency or min(2 * engine.max_batch, engine.max_queue)
    start = time.monotonic()
    engine.start()
    try:
        answers = asyncio.run(_run(engine, settings, lines, concurrency, progress, input_path))
    finally:
        engine.stop(0.0)
    report.seconds = time.monotonic() - start
    out = []
    for line, answer in zip(lines, answers):
        if answer is None:
            report.invalid += 1
        elif answer[0] == 200:
            report.succeeded += 1
            prompt, completion, _ = tokens_of(answer[1])
            report.prompt_tokens += prompt
            report.completion_tokens += completion
        else:
            report.failed[answer[0]] = report.failed.get(answer[0], 0) + 1
        out.append(json.dumps(entry(line, answer)) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with atomic_file(output_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(out)
    return report
