"""`flamingo serve`: load a saved model, start the engine, run the app under uvicorn until SIGTERM / Ctrl-C.

On SIGTERM (or SIGINT) the server stops accepting requests (uvicorn closes its listening socket and idle connections
at once, so new ones are refused at connect; one already past its headers gets 503), and uvicorn waits
for in-flight requests to finish; `grace` seconds after the signal the engine fails what is left, so that each of
their streams ends with an error event and `[DONE]` (a whole answer: a 500) while its connection is still open; then
the process exits with status 0. uvicorn's own limit, `CLOSE_SECONDS` later, cancels only responses that still did
not end (an engine step that outlasts it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..convert.auto import load_model
from ..runtime.hub import is_hub_name
from .app import ServeSettings, create_app
from .engine import DEFAULT_PREFIX_CACHE_MIB, DEFAULT_VISION_CACHE_MIB, Engine, check_engine_options
from .media import MediaPolicy
from .middleware import LOOPBACK_NAMES, OpenConnections, RequestIdFilter, loopback_interface

log = logging.getLogger(__name__)
CLOSE_SECONDS = 10.0  # after the grace: for the engine's step in progress to end and the error events to be written
DEFAULT_KEEP_ALIVE = 5.0  # uvicorn's: behind a proxy that reuses connections, set it above the proxy's idle timeout


def build_engine(model_dir: str, *, dtype: Optional[torch.dtype] = None, device: str = "cpu", max_batch: int = 16,
                 max_queue: int = 64, prefill_chunk: int = 64, quantize_frozen: Optional[str] = None,
                 prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB,
                 vision_cache_mib: float = DEFAULT_VISION_CACHE_MIB, compile: bool = False,
                 revision: Optional[str] = None, prefill_batch_tokens: Optional[int] = None) -> Engine:
    check_engine_options(max_batch, max_queue, prefill_chunk)  # before the model loads: a bad size fails at once
    model, processor = load_model(model_dir, torch_dtype=dtype, device=device, quantize_frozen=quantize_frozen,
                                  revision=revision)
    engine = Engine(model, processor, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    prefix_cache_mib=prefix_cache_mib, vision_cache_mib=vision_cache_mib,
                    compile_backend="inductor" if compile else None, prefill_batch_tokens=prefill_batch_tokens)
    if compile:  # the server listens once its first decode shapes are compiled
        log.info("compiling the decode step's first shapes before serving")
        engine.warm_up()
    return engine


def settings_for(model_dir: str, *, api_key: Optional[str] = None, max_body_mb: float = 20,
                 max_tokens_cap: int = 512, max_images: int = 32, media_root: Optional[str] = None,
                 allow_remote_media: bool = False, allow_private_media_hosts: bool = False,
                 max_image_pixels: int = 20_000_000, max_video_seconds: float = 600.0,
                 model_name: Optional[str] = None,
                 batch_dir: Optional[str] = None, batch_concurrency: Optional[int] = None,
                 max_batch_file_mb: float = 200, host: Optional[str] = None,
                 allowed_hosts: Sequence[str] = ()) -> ServeSettings:
    """The app's settings from `flamingo serve`'s options. host: the interface bound (None: not served over a
    socket); bound to loopback, the server answers Host names of loopback and `allowed_hosts` only, as it does on
    any interface when `allowed_hosts` is given (middleware.BrowserGuard)."""
    if media_root is not None and not os.path.isdir(media_root):  # else every local path would be refused, unsaid
        raise ValueError(f"the media root {media_root!r} (--media-root) is not a directory: name the directory local "
                         "media paths are read under, or leave the option out to refuse them all")
    if allow_private_media_hosts and not allow_remote_media:
        raise ValueError("--allow-private-media-hosts widens --allow-remote-media (remote media from private "
                         "addresses too), which is not set: add it, or leave both out")
    media = MediaPolicy(root=Path(media_root) if media_root else None, allow_remote=allow_remote_media,
                        allow_private=allow_private_media_hosts, max_pixels=max_image_pixels,
                        max_bytes=int(max_body_mb * 2**20), max_video_seconds=max_video_seconds)
    if model_name is None:  # a Hub repository's full name, as other OpenAI-compatible servers name it
        hub = not os.path.isdir(model_dir) and is_hub_name(model_dir)
        model_name = model_dir if hub else Path(os.path.abspath(model_dir)).name
    names: Optional[tuple[str, ...]] = None
    loopback = host is not None and loopback_interface(host)
    if allowed_hosts or loopback:
        names = tuple(dict.fromkeys((*LOOPBACK_NAMES, *((host,) if loopback else ()), *allowed_hosts)))
    return ServeSettings(model_name=model_name, api_key=api_key, allowed_hosts=names,
                         max_body_bytes=int(max_body_mb * 2**20), max_tokens_cap=max_tokens_cap,
                         max_images=max_images, media=media, batch_dir=batch_dir,
                         batch_concurrency=batch_concurrency, max_batch_file_bytes=int(max_batch_file_mb * 2**20))


def exposure(host: str, settings: ServeSettings) -> Optional[str]:
    """A warning for a server that anyone on the network may use: bound beyond loopback with no API key."""
    if loopback_interface(host) or settings.api_key is not None:
        return None
    return (f"serving on {host} without --api-key: anyone who can reach this address can run the model, and its "
            "Files and Batch APIs when --batch-dir is set (give --api-key KEY, or --host 127.0.0.1)")


def uvicorn_config(engine: Engine, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
                   grace: float = 30.0, log_level: str = "info", root_path: str = "",
                   keep_alive: float = DEFAULT_KEEP_ALIVE, max_connections: Optional[int] = None) -> Any:
    """uvicorn's settings for the app. root_path: the prefix a reverse proxy mounts the server under and strips;
    keep_alive: seconds an idle connection stays open (longer than a proxy's, so that the proxy closes first), and
    a request's body may stop arriving (middleware.BodyTimeout: 408);
    max_connections: connections open at once (idle keep-alive ones count); past it, a request on any of them gets
    503 (None: no limit). The limit is kept in the app (middleware.ConnectionLimit: its 503 carries the request's
    id, an OpenAI-style body and Retry-After, and is counted), on connections counted by uvicorn's own HTTP
    protocol, which also closes a connection no request began on within `keep_alive` seconds, limit or not. No
    WebSocket upgrade is taken (the app has no WebSocket route), so every connection stays in that protocol, which
    counts its end."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    connections = OpenConnections(max_connections, silent_seconds=keep_alive)
    app = create_app(engine, settings, connections, body_timeout=keep_alive)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=log_config(),
                          timeout_graceful_shutdown=grace + CLOSE_SECONDS, root_path=root_path,
                          timeout_keep_alive=keep_alive,
                          http=connections.protocol(AutoHTTPProtocol),
                          ws="none")


def log_config() -> dict[str, Any]:
    """uvicorn's logging, its access lines ending with the request's id (`X-Request-Id`, middleware.RequestIds)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    config["handlers"]["access"]["filters"] = ["request_id"]
    config["formatters"]["access"]["fmt"] += " %(request_id)s"
    return config


def serve(engine: Engine, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          grace: float = 30.0, log_level: str = "info", root_path: str = "",
          keep_alive: float = DEFAULT_KEEP_ALIVE, max_connections: Optional[int] = None) -> None:
    """Run until SIGTERM / SIGINT; returns after a clean shutdown. The other arguments: `uvicorn_config`'s."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if engine.accepting:  # the first signal: fail what is left when the grace runs out
                engine.drain()  # before uvicorn stops reading: requests still arriving get 503
                threading.Thread(target=engine.stop, args=(grace,), name="flamingo-grace", daemon=True).start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """As uvicorn's, but the signal is not raised again after the shutdown: a drained server exits 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    if (exposed := exposure(host, settings)) is not None:
        log.warning(exposed)
    engine.start()
    config = uvicorn_config(engine, settings, host=host, port=port, grace=grace, log_level=log_level,
                            root_path=root_path, keep_alive=keep_alive, max_connections=max_connections)
    Server(config).run()
    engine.stop(0.0)
