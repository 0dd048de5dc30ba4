"""A finished request gives its memory back at once: its job (prompt ids, preprocessed media) is not kept alive by
reference cycles that only Python's cyclic collector breaks, which with torch's large heap runs rarely (a soak held
~240 MB of 224-px images for 106 finished chat requests until a collection)."""

from __future__ import annotations

import gc
import time
import weakref

import httpx

from flamingo.serve.app import ServeSettings
from flamingo.tiny import random_image

from serve_helpers import data_url, engine_for, running_server, save_tiny_model


def _message(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(random_image(seed))}},
                                         {"type": "text", "text": "Describe it:"}]}]


def test_finished_and_cut_requests_free_their_media_without_the_cyclic_collector(tmp_path):
    """The job's emit closed over the job (a cycle: job -> emit -> job), and a cut stream's job stays in its
    traceback's cycles: the media of both lived until a collection. The job drops them once its prefill holds them
    and its emit holds no job, so reference counting frees them (the collector is off here)."""
    engine = engine_for(save_tiny_model(tmp_path / "model"))
    media: list[weakref.ref] = []
    submit_all = engine.submit_all

    def watched(jobs):
        media.extend(weakref.ref(job.media["images"]) for job in jobs)
        return submit_all(jobs)

    engine.submit_all = watched
    gc.collect()
    gc.disable()
    try:
        with running_server(engine, ServeSettings(model_name="tiny")) as url:
            for seed in range(3):
                body = {"messages": _message(seed), "max_tokens": 4, "temperature": 0}
                assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
            body = {"messages": _message(9), "max_tokens": 200, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and "content" in line:
                        break  # the first token: go away
            deadline = time.monotonic() + 20
            while (engine.running_rows or any(ref() is not None for ref in media)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(media) == 4
            assert [ref() is None for ref in media] == [True] * 4
    finally:
        gc.enable()
