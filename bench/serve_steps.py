"""The serving engine's two costs, in-process (no HTTP): one decode step of a `DecodeBatch` at 1, 4 and 16 rows
(prompts of equal or mixed lengths), and one k-shot prompt's prefill split into vision encoding and LM prefill; alone,
and after a prompt with the same demonstrations (another query image) filled the prefix cache.

    python -m bench.serve_steps --shape cpu --threads 1
    python -m bench.serve_steps --shape cpu --threads 1 --profile     # + matmul time per weight shape (torch.profiler)
    python -m bench.serve_steps --shape cpu --threads 1 --compile     # + the compiled step (`flamingo serve --compile`)
    python -m bench.serve_steps --shape gpu --device cuda --dtype bf16 --compile --shots 0 8 --rows 1 4 16 64

What it answers: how much a batched decode step costs over a one-row step (so whether batching makes decoding
cheap), what padding rows to the longest one costs (a mixed batch attends over its longest prompt's length, as
a batch of long prompts does; a batch of short prompts over the shortest: the mixed step against the two), how
a prefill splits between the vision tower and the LM, and (`--compile`) what a compiled step (inductor; CUDA graphs on
a GPU; fixed shapes, model/batching.py) costs against the eager one on the same prompts, and how long its first call
took to compile. Prompts are bench/generate.py's SHOT * k + QUERY with k + 1
images, the model is bench/serve.py's (random weights, gates 0.3). Times are the fastest of `--repeats` calls after one
warm-up (the least disturbed on shared cores).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Optional

import torch

from bench.common import SHAPES, machine, parse_args, print_json, print_table, sync
from bench.generate import QUERY, SHOT
from bench.serve import build_model
from flamingo.model.batching import DecodeBatch
from flamingo.model.prefill import Prefill, PrefilledRow
from flamingo.model.prefix_cache import PrefixCache
from flamingo.runtime import DTYPE_NAMES, torch_dtype
from flamingo.tiny import random_image


def _seconds(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> float:
    """The fastest of `repeats` calls after a warm-up: on cores shared with other jobs, the least disturbed one.
    Each call is finished on `device` before the clock reads it (CUDA runs kernels after their launch returns)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def k_shot(processor: Any, k: int, image_size: int, seed: int = 0, query_seed: Optional[int] = None,
           device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, Any]]:
    """A k-shot prompt's ids (T,) and its media as the server batches them, on `device` (query_seed: the query
    image's seed, so prompts of one `seed` share their demonstrations)."""
    images = [random_image(100 * seed + j, size=image_size) for j in range(k)]
    images.append(random_image(100 * seed + k if query_seed is None else 10**6 + query_seed, size=image_size))
    ids, media = processor.encode_prompt(SHOT * k + QUERY, images, max_length=2**62)
    media = processor.batch_media([media])
    media["images"] = media["images"].to(device, dtype)
    return torch.tensor(ids, dtype=torch.long, device=device), media


def _prompt(processor: Any, k: int, image_size: int, query: int, device: str, dtype: torch.dtype
            ) -> tuple[torch.Tensor, ...]:
    """Prefill's arguments for a k-shot prompt with the demonstrations of seed 0 and query image `query`."""
    ids, media = k_shot(processor, k, image_size, query_seed=query, device=device, dtype=dtype)
    return ids, media["images"], media.get("num_media"), media.get("num_frames")


def _matmuls(fn: Callable[[], Any], repeats: int) -> tuple[float, dict[str, float]]:
    """Self time of `aten::mm` per call of `fn` (ms), in all and by weight shape `in x out` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            fn()
    by_shape: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key == "aten::mm" and len(event.input_shapes) == 2 and len(event.input_shapes[1]) == 2:
            key = "x".join(str(n) for n in event.input_shapes[1])
            by_shape[key] = by_shape.get(key, 0.0) + event.self_cpu_time_total / 1e3 / repeats
    by_shape = {k: round(v, 2) for k, v in sorted(by_shape.items(), key=lambda kv: -kv[1])}
    return sum(by_shape.values()), by_shape


def _spread(shots: list[int], rows: int) -> list[int]:
    """`rows` shot counts spread over `shots` from its first to its last (so the batch holds both ends)."""
    ordered = sorted(shots)
    return [ordered[i * (len(ordered) - 1) // max(1, rows - 1)] for i in range(rows)]


def _filled(batch: DecodeBatch, prefilled: dict[int, PrefilledRow], shots: list[int]) -> DecodeBatch:
    for k in shots:
        batch.add(prefilled[k])
    return batch


def _synced(step: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """One step, finished on the device before the clock reads it."""
    logits = step(tokens)
    if logits.is_cuda:
        torch.cuda.synchronize()
    return logits


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--xattn-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also profile the equal-short steps: time of the step's matmuls by weight shape")
    parser.add_argument("--compile", action="store_true",
                        help="also time each decode step compiled (inductor), side by side with the eager one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    args = parse_args(parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench.serve_steps on {machine()}, shape={args.shape}, {args.dtype}, device={args.device}, "
          f"threads={torch.get_num_threads()}")
    model, processor, size = build_model(args.shape, args.xattn_every)
    dtype = torch_dtype(args.dtype)
    model.to(device=args.device, dtype=dtype)

    prefilled: dict[int, PrefilledRow] = {}
    prefill_rows = []
    for k in args.shots:
        ids, media = k_shot(processor, k, size, device=args.device, dtype=dtype)
        images, num_media, num_frames = media["images"], media.get("num_media"), media.get("num_frames")

        def prefill() -> PrefilledRow:
            return Prefill(model, ids, images, num_media, num_frames).step(2**62)

        whole = _seconds(prefill, max(1, args.repeats // 3), args.device)
        vision = _seconds(lambda: model.encode_media(images, num_media, num_frames), max(1, args.repeats // 3),
                          args.device)
        prefilled[k] = prefill()
        row = {"shots": k, "prompt_tokens": int(ids.numel()), "images": k + 1, "prefill_ms": 1e3 * whole,
               "vision_ms": 1e3 * vision, "lm_ms": 1e3 * (whole - vision)}
        # the same demonstrations, another query image: the prefix cache holds an earlier prompt's blocks
        cache = PrefixCache(2**30)
        Prefill(model, *_prompt(processor, k, size, 0, args.device, dtype), prefix_cache=cache).step(2**62)
        queries = iter(range(1, 10**6))

        def shared() -> PrefilledRow:
            return Prefill(model, *_prompt(processor, k, size, next(queries), args.device, dtype),
                           prefix_cache=cache).step(2**62)

        warm = _seconds(shared, max(1, args.repeats // 3), args.device)
        row.update(shared_demos_ms=1e3 * warm, cached_tokens=shared().cached_tokens, vs_alone=whole / warm)
        prefill_rows.append(row)
        print_json("serve_steps.prefill", {"shape": args.shape, **row})
    print_table(prefill_rows, ["shots", "prompt_tokens", "images", "prefill_ms", "vision_ms", "lm_ms",
                               "shared_demos_ms", "cached_tokens", "vs_alone"])

    longest, shortest = max(args.shots), min(args.shots)
    step_rows, one_row = [], None
    for rows in args.rows:
        for label, shots in (("equal, short", [shortest] * rows), ("equal, long", [longest] * rows),
                             ("mixed", _spread(args.shots, rows))):
            if rows == 1 and label == "mixed":
                continue
            batch = _filled(DecodeBatch(model, max(args.rows)), prefilled, shots)
            tokens = torch.full((rows,), 5, dtype=torch.long)
            seconds = _seconds(lambda: _synced(batch.step, tokens), args.repeats)
            if rows == 1 and label == "equal, short":
                one_row = seconds
            row = {"rows": rows, "prompts": label, "batch_length": batch.length, "step_ms": 1e3 * seconds,
                   "vs_one_row": seconds / one_row, "ms_per_row": 1e3 * seconds / rows}
            if args.compile:  # the same prompts in a compiled batch: its first step compiles this shape
                compiled = _filled(DecodeBatch(model, max(args.rows), compile_backend="inductor"), prefilled, shots)
                start = time.perf_counter()
                _synced(compiled.step, tokens)
                row["compile_s"] = time.perf_counter() - start
                row["compiled_ms"] = 1e3 * _seconds(lambda: _synced(compiled.step, tokens), args.repeats)
                row["eager_vs_compiled"] = row["step_ms"] / row["compiled_ms"]
            if args.profile and label == "equal, short":
                row["matmul_ms"], row["matmul_by_shape_ms"] = _matmuls(lambda: batch.step(tokens), args.repeats)
            step_rows.append(row)
            print_json("serve_steps.decode", {"shape": args.shape, **row})
    print_table(step_rows, ["rows", "prompts", "batch_length", "step_ms", "vs_one_row", "ms_per_row", "matmul_ms"]
                + (["compiled_ms", "eager_vs_compiled", "compile_s"] if args.compile else []))
    for row in step_rows:
        if "matmul_by_shape_ms" in row:
            print(f"# {row['rows']} rows, ms per step by (in, out) weight shape: {row['matmul_by_shape_ms']}")


if __name__ == "__main__":
    main()
