"""Serving throughput and latency: `flamingo serve` (continuous batching) under concurrent clients vs the same
requests sent one at a time.

    python -m bench.serve --shape cpu                                 # 2 CPU cores: clients 1 4 16 64, fp32
    python -m bench.serve --shape gpu --device cuda --dtype bf16      # batch up to 64
    python -m bench.serve --shape tiny --requests 8 --clients 1 4     # smoke run
    python -m bench.serve --shape cpu --shared-demos --prefix-cache-mib 0 1024   # few-shot: prefix cache off, on

A model of the shape (bench/common.py's SHAPES, random weights, gates 0.3) is saved to a temporary directory and
served by `python -m flamingo.cli serve` in a subprocess (its own cores and GIL); this process runs the clients
(asyncio, one connection each, closed loop: a client sends its next request when its answer is complete). Requests:
k-shot prompts of bench/generate.py's SHOT / QUERY with k drawn from `--shots` (mixed lengths and image counts),
greedy, `--max-tokens` new tokens at most, streamed. Each token comes as one server-sent event, timestamped on
arrival: time to first token = first token - request sent; inter-token latency = gaps between one stream's tokens
(so a gap that a joining request's prefill chunk lengthens is counted). Throughput = completion tokens / wall time.
Clients 1 is "one at a time": the same requests, sequentially. Each client count runs on a fresh server, warmed up by
two other requests (so no phase finds an earlier phase's prompts in the prefix cache). `same_answers` checks every
request's answer against the one-at-a-time run's (greedy output must not depend on the batch).

`prefill_ceiling` (from the one-at-a-time run): (mean prefill + mean decode) / mean prefill per request, with prefill =
time to first token and decode = the rest of the stream: with prompts prefilled one at a time, even with decoding
made free by batching a request costs at least its prefill, so no client count could beat this ratio. The server
prefills prompts that wait while no row runs together, in one call (`--prefill-batch-tokens`, one server per value;
0: one at a time), which can pass it.

`--shared-demos`: the k demonstrations' images are the same in every request of that k, as in few-shot use with fixed
demonstrations; only the query image differs. `--prefix-cache-mib` (the server's prefix cache; several values: one
server each, the same requests, compared with the first at each client count): `cached_share` = prompt tokens the
server reported as cached (`usage.prompt_tokens_details.cached_tokens`) / all prompt tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import httpx
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from bench.common import SHAPES, machine, parse_args, print_json, print_table
from bench.generate import QUERY, SHOT
from flamingo.build import from_backbones
from flamingo.config import FlamingoConfig
from flamingo.model.flamingo import Flamingo
from flamingo.runtime import DTYPE_NAMES
from flamingo.tiny import random_image, set_gates, tiny_image_processor, tiny_tokenizer


def build_model(shape: str, xattn_every: int, gate: float = 0.3, seed: int = 0) -> tuple[Flamingo, Any, int]:
    """A random Flamingo of `shape` (eval mode) with its processor and image size."""
    spec = SHAPES[shape]
    torch.manual_seed(seed)
    tok = tiny_tokenizer(pad_vocab_to=spec["vocab"]) if spec["vocab"] > 300 else tiny_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=0, eos_token_id=0, **spec["lm"])).eval()
    vision = CLIPVisionModel(CLIPVisionConfig(**spec["vision"])).eval()
    size = spec["vision"]["image_size"]
    model, processor = from_backbones(vision, lm, tok, FlamingoConfig(xattn_every=xattn_every),
                                      image_processor=tiny_image_processor("clip", size))
    set_gates(model, gate)
    return model.eval(), processor, size


def save_model(shape: str, directory: str, xattn_every: int, gate: float = 0.3, seed: int = 0) -> int:
    """A random Flamingo of `shape` saved with its processor; returns the image size."""
    model, processor, size = build_model(shape, xattn_every, gate, seed)
    model.save_pretrained(directory, processor=processor)
    return size


def requests_for(count: int, shots: list[int], image_size: int, max_tokens: int, seed: int = 0,
                 shared_demos: bool = False) -> list[dict]:
    """`count` raw k-shot completion requests (k from `shots`), each with its own random images (other images for
    another seed); shared_demos: the k demonstrations' images are the same in every request of that k (whatever
    the seed), only the query image differs."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        k = rng.choice(shots)
        media = []
        for j in range(k + 1):
            buffer = io.BytesIO()
            own = 10**6 * seed + 1000 * i + j  # each request's own images (per seed)
            random_image(j if shared_demos and j < k else own, size=image_size).save(buffer, format="PNG")
            media.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        out.append({"prompt": SHOT * k + QUERY, "media": media, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}})
    return out


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict[str, Any]:
    sent = time.perf_counter()
    stamps: list[float] = []
    text, usage = "", None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                if choice["finish_reason"] is None:  # one event per token, then one that says why it ended
                    stamps.append(time.perf_counter())
                text += choice["text"]
            usage = chunk.get("usage") or usage
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    ttft = stamps[0] - sent if stamps else float("nan")  # a stream that ended before any token has none
    return {"text": text, "tokens": usage["completion_tokens"], "ttft": ttft, "gaps": gaps,
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


async def run_clients(url: str, requests: list[dict], clients: int) -> tuple[float, list[dict]]:
    """Closed loop: `clients` workers take the next request when their last one is answered."""
    queue = list(enumerate(requests))
    results: list[Any] = [None] * len(requests)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        async def worker() -> None:
            while queue:
                i, body = queue.pop(0)
                results[i] = await _one(client, url, body)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - start, results


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def prefill_ceiling(results: list[dict[str, Any]]) -> float:
    """(mean prefill + mean decode) / mean prefill of one-at-a-time results: the throughput ratio that serial prefill
    allows whatever the batch (prefill = time to first token, decode = the sum of a stream's token gaps)."""
    prefill = sum(r["ttft"] for r in results) / len(results)
    decode = sum(sum(r["gaps"]) for r in results) / len(results)
    return (prefill + decode) / prefill


def _batch_mean(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    read = lambda name: float(text.split(f"flamingo_batch_size_{name} ")[1].split()[0])  # noqa: E731
    return read("sum"), read("count")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stderr_tail(log: Optional[str], lines: int = 20) -> str:
    if log is None:
        return ""
    with open(log, encoding="utf-8", errors="replace") as f:
        tail = f.read().splitlines()[-lines:]
    return ("; the end of its stderr:\n" + "\n".join(tail)) if tail else " (nothing on its stderr)"


def wait_until_healthy(url: str, server: Optional[subprocess.Popen] = None, log: Optional[str] = None,
                       tries: int = 600) -> None:
    """Poll a starting `flamingo serve` until `/health` answers 200 (half a second between tries). When `server` (its
    process) has exited, fail at once rather than poll on, with the tail of its stderr (the file `log`): a bad flag
    or device, a model that does not load, a port in use."""
    for _ in range(tries):
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it answered /health"
                               + _stderr_tail(log))
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url}/health within {tries * 0.5:.0f} s" + _stderr_tail(log))


@contextmanager
def serving(options: Sequence[str], stop_timeout: Optional[float] = 120) -> Iterator[str]:
    """`python -m flamingo.cli serve OPTIONS` on a free port, in a subprocess, once healthy: yields its URL, and
    stops it on exit. Its stderr goes to a temporary file, whose tail a failed start shows (`wait_until_healthy`)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "server.stderr")
        with open(log, "wb") as stderr:
            server = subprocess.Popen([sys.executable, "-m", "flamingo.cli", "serve", *options, "--port", str(port)],
                                      stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, server, log)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=stop_timeout)


def run_server_phase(args: argparse.Namespace, model_dir: str, requests: list[dict], warmup: list[dict],
                     mib: float, clients: int, batch_tokens: Optional[int] = None) -> dict[str, Any]:
    """A fresh `flamingo serve` (prefix cache of `mib` MiB, shared prefills of up to `batch_tokens`, None: its
    default), warmed up with `warmup`, runs `requests` with `clients` clients: one row. Fresh, so that no phase finds
    the prompts of an earlier one in the prefix cache."""
    options = ["--model", model_dir, "--max-batch", str(args.max_batch), "--max-queue", str(max(args.clients) + 8),
               "--prefill-chunk", str(args.prefill_chunk), "--device", args.device, "--dtype", args.dtype,
               "--max-images", "64", "--prefix-cache-mib", str(mib),
               *(["--threads", str(args.threads)] if args.threads else []),
               *(["--prefill-batch-tokens", str(batch_tokens)] if batch_tokens is not None else [])]
    with serving(options) as url:
        asyncio.run(run_clients(url, warmup, 1))
        before = _batch_mean(url)
        wall, results = asyncio.run(run_clients(url, requests, clients))
        after = _batch_mean(url)
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    row = {"prefix_cache_mib": mib, "prefill_batch_tokens": "default" if batch_tokens is None else batch_tokens,
           "clients": clients, "requests": len(results), "tokens": tokens,
           "seconds": wall, "output_tok_s": tokens / wall, "ttft_p50_ms": 1e3 * _pct(ttfts, 50),
           "ttft_p99_ms": 1e3 * _pct(ttfts, 99), "itl_p50_ms": 1e3 * _pct(gaps, 50),
           "itl_p99_ms": 1e3 * _pct(gaps, 99), "itl_max_ms": 1e3 * max(gaps, default=float("nan")),
           "mean_batch": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
           "cached_share": sum(r["cached_tokens"] for r in results) / sum(r["prompt_tokens"] for r in results),
           "texts": [r["text"] for r in results], "prefill_ceiling": prefill_ceiling(results)}
    row["itl_p99_over_p50"] = row["itl_p99_ms"] / row["itl_p50_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per client count (the same ones)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--shared-demos", action="store_true",
                        help="the demonstrations' images are the same in all requests of one k (few-shot use)")
    parser.add_argument("--prefix-cache-mib", type=float, nargs="+", default=[1024],
                        help="one server per value, the same requests; with several, rows compare to the first")
    parser.add_argument("--prefill-batch-tokens", type=int, nargs="+", default=[None],
                        help="one server per value (0: prompts prefilled one at a time; default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--xattn-every", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    args = parse_args(parser)
    print(f"# bench.serve on {machine()}, shape={args.shape}, dtype={args.dtype}, max_batch={args.max_batch}, "
          f"prefill_chunk={args.prefill_chunk}, server threads={args.threads or torch.get_num_threads()}, "
          f"shared demos={args.shared_demos}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        image_size = save_model(args.shape, model_dir, args.xattn_every)
        requests = requests_for(args.requests, args.shots, image_size, args.max_tokens,
                                shared_demos=args.shared_demos)
        # other query images (the same demonstrations when they are shared): no measured prompt is warmed up
        warmup = requests_for(2, args.shots, image_size, args.max_tokens, seed=1, shared_demos=args.shared_demos)
        first: dict[int, dict] = {}
        alone: dict[tuple, dict] = {}
        for mib, batch_tokens in itertools.product(args.prefix_cache_mib, args.prefill_batch_tokens):
            for clients in args.clients:
                row = run_server_phase(args, model_dir, requests, warmup, mib, clients, batch_tokens)
                base = alone.setdefault((mib, batch_tokens), row)  # the first client count (1: one at a time)
                row["vs_one_at_a_time"] = row["output_tok_s"] / base["output_tok_s"]
                row["same_answers"] = row["texts"] == base["texts"]
                row["prefill_ceiling"] = base["prefill_ceiling"]
                base = first.setdefault(row["clients"], row)
                if base is not row:  # the same clients against the first server: throughput and latency ratios
                    row["tok_s_vs_first"] = row["output_tok_s"] / base["output_tok_s"]
                    row["ttft_p50_vs_first"] = row["ttft_p50_ms"] / base["ttft_p50_ms"]
                    row["same_as_first"] = row["texts"] == base["texts"]
                rows.append(row)
                print_json("serve", {"shape": args.shape, "device": machine(), "dtype": args.dtype,
                                     "max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk,
                                     "max_tokens": args.max_tokens, "shots": args.shots,
                                     "shared_demos": args.shared_demos,
                                     **{k: v for k, v in row.items() if k != "texts"}})
    columns = ["prefix_cache_mib", "prefill_batch_tokens", "clients", "requests", "tokens", "output_tok_s",
               "vs_one_at_a_time", "prefill_ceiling", "same_answers", "cached_share", "ttft_p50_ms", "ttft_p99_ms",
               "itl_p50_ms", "itl_p99_ms", "itl_p99_over_p50", "itl_max_ms", "mean_batch"]
    if len(args.prefix_cache_mib) * len(args.prefill_batch_tokens) > 1:
        columns += ["tok_s_vs_first", "ttft_p50_vs_first", "same_as_first"]
    print_table(rows, columns)


if __name__ == "__main__":
    main()
