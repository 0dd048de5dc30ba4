"""Test-only helpers for the server's tests: a tiny saved model, and the app served by uvicorn in a thread on a free
loopback port (bounded start and stop, no hangs)."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from flamingo.build import load_pretrained
from flamingo.serve.app import ServeSettings
from flamingo.serve.engine import Engine
from flamingo.serve.server import uvicorn_config
from flamingo.tiny import tiny_flamingo

SHOT = "<image>Question: what is in the image? Short answer: a red circle.<|endofchunk|>"


# Tiny LMs initialised wide: their greedy answers differ from prompt to prompt and token to token (at the default
# scale every prompt's answer repeats one token), so a row that read another row's state could not go unnoticed.
SHARP = {"llama": {"initializer_range": 1.0}, "gpt2": {"initializer_range": 1.0}, "opt": {"init_std": 1.0},
         "mosaic_gpt": {"initializer_range": 1.0}, "qwen2": {"initializer_range": 1.0}}


def save_tiny_model(directory: Path, lm: str = "llama", seed: int = 0) -> Path:
    """A tiny Flamingo (gates 0.5, so images matter; a `SHARP` LM) saved as a user would, with its processor."""
    model, processor = tiny_flamingo(lm, "clip", gates=0.5, seed=seed, lm_overrides=SHARP[lm])
    model.save_pretrained(str(directory), processor=processor)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60.0) -> bool:
    """Whether a server started in another process answers `/health` within `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.2)
    return False


def engine_for(model_dir: Path, **kwargs) -> Engine:
    model, processor = load_pretrained(str(model_dir))
    return Engine(model, processor, **kwargs)


@contextlib.contextmanager
def running_server(engine: Engine, settings: ServeSettings, timeout: float = 30.0,
                   start_engine: bool = True, root_path: str = "", log_level: str = "warning",
                   **options: Any) -> Iterator[str]:
    """Serve `create_app(engine, settings)` on 127.0.0.1:<free port>, with `flamingo serve`'s uvicorn settings
    (options: `uvicorn_config`'s keep_alive, max_connections; log_level "info" writes uvicorn's access lines);
    yields the base URL. start_engine=False: requests queue up and nothing runs them (until the server stops and
    fails them)."""
    import uvicorn

    if start_engine:
        engine.start()
    port = free_port()
    config = uvicorn_config(engine, settings, host="127.0.0.1", port=port, grace=0.0, log_level=log_level,
                            root_path=root_path, **options)
    config.timeout_graceful_shutdown = 5  # a test's queued requests (start_engine=False) hold the stop this long
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
        engine.stop(0.0)


def greedy_alone(engine: Engine, prompt: str, media: list, max_tokens: int) -> list[int]:
    """The tokens `model.generate(do_sample=False)` gives for one prompt alone (up to its stop token)."""
    model, processor = engine.model, engine.processor
    batch = processor(prompt, images=media)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def data_url(image, fmt: str = "PNG") -> str:
    """A PIL image as a `data:image/...;base64,` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_client(url: str):
    """The official client on a test server (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def submit_job(engine: Engine, prompt: str, media: list, params, grammar=None):
    """Queue a job straight on the engine (no HTTP); returns wait() -> (token ids of choice 0, the job's events)."""
    from flamingo.serve.engine import Job

    ids, medium = engine.processor.encode_prompt(prompt, media)
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if event.kind in ("done", "error"):
            done.set()

    def wait():
        assert done.wait(60), "the engine did not finish the job"
        assert events[-1].kind == "done", events[-1].message
        return next(e.tokens for e in events if e.kind == "finish"), events

    engine.submit(Job(torch.tensor(ids), engine.processor.batch_media([medium]), params, emit, grammar=grammar))
    return wait


@contextlib.contextmanager
def serving_tiny(root: Path, settings: Optional[ServeSettings] = None, **engine_kwargs) -> Iterator[tuple[Engine, str]]:
    """A `save_tiny_model` under `root` served (model name "tiny" unless `settings` say otherwise): (engine, URL)."""
    engine = engine_for(save_tiny_model(root / "model"), **engine_kwargs)
    with running_server(engine, settings or ServeSettings(model_name="tiny")) as url:
        yield engine, url


def fail_sends_of(monkeypatch: Any, marker: str) -> None:
    """Batch lines whose body holds `marker` fail to send (the client sending them raises, as on a broken
    connection); the others are answered as usual."""
    import httpx

    from flamingo.serve import batch_lines

    answer = batch_lines._answer

    async def fail_some(client: Any, request: dict, stop: Any = None) -> Any:
        if marker in repr(request["body"]):
            raise httpx.RemoteProtocolError("the connection broke")
        return await answer(client, request, stop)

    monkeypatch.setattr(batch_lines, "_answer", fail_some)
