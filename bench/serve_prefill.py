"""Prompts prefilled together (`prefill_together`, what `flamingo serve` does with prompts that wait while no row runs)
against the same prompts prefilled one at a time, in-process (no HTTP): N waiting prompts of one kind, from a chat
question without an image to k-shot prompts, each with its own images.

    python -m bench.serve_prefill --shape cpu --threads 1
    python -m bench.serve_prefill --shape gpu --device cuda --dtype bf16 --prompts 4 16 64

The model is bench/serve.py's (random weights, gates 0.3); prompts are bench/generate.py's SHOT * k + QUERY with
k + 1 images, a short chat question without an image, and "mixed": 0-, 2- and 8-shot prompts in turn, padded to the
longest (the engine shares a call only while padding stays under 1.5x its prompts' tokens). Both sides run the
vision tower on every image (no vision or prefix cache) and end with every prompt's row (cache, images' K/V, last
logits). Times are the fastest of `--repeats` calls after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from bench.common import SHAPES, machine, parse_args, print_json, print_table
from bench.serve import build_model
from bench.serve_steps import _seconds, k_shot
from flamingo.model.prefill import Prefill, prefill_together
from flamingo.runtime import DTYPE_NAMES, torch_dtype

CHAT = "Question: what colour is the sky on a clear day? Answer:"
MIXED = (0, 2, 8)  # kind "mixed": prompts of 0, 2 and 8 shots in turn (padded to the longest)


def _prompts(processor: Any, kind: str, n: int, size: int, device: str, dtype: torch.dtype) -> list[tuple]:
    """n prompts of one kind ("chat", "k-shot", or "mixed"), each with images of its own."""
    if kind == "chat":
        return [(torch.tensor(processor.token_ids(CHAT), device=device), None, None, None)] * n
    out = []
    for i in range(n):
        k = MIXED[i % len(MIXED)] if kind == "mixed" else int(kind.split("-")[0])
        ids, media = k_shot(processor, k, size, seed=i, device=device, dtype=dtype)
        out.append((ids, media["images"], media.get("num_media"), media.get("num_frames")))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument("--kinds", nargs="+", default=["chat", "0-shot", "2-shot", "8-shot"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    args = parse_args(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    model, processor, size = build_model(args.shape, 1)
    model.to(args.device, dtype)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    print(f"# bench.serve_prefill on {machine()}: shape {args.shape}, {args.device}, {args.dtype}", flush=True)
    results = []
    with torch.no_grad():
        for kind in args.kinds:
            for n in args.prompts:
                prompts = _prompts(processor, kind, n, size, args.device, dtype)

                def alone() -> None:
                    for p in prompts:
                        prefill, row = Prefill(model, *p), None
                        while row is None:
                            row = prefill.step()
                    sync()

                def together() -> None:
                    fresh = [Prefill(model, *p) for p in prompts]
                    for prefill in fresh:
                        prefill.prepare()
                    prefill_together(model, fresh)
                    sync()

                t_alone, t_together = _seconds(alone, args.repeats), _seconds(together, args.repeats)
                lengths = [p[0].numel() for p in prompts]
                results.append({"kind": kind, "prompts": n, "tokens": max(lengths),
                                "padded": max(lengths) * n / sum(lengths),
                                "alone_ms": 1000 * t_alone, "together_ms": 1000 * t_together,
                                "together_vs_alone": t_together / t_alone})
                # each row as it ends: a run cut at its time limit (bench/device_checks.sh) keeps the rows it made
                print_json("serve_prefill.row", {"shape": args.shape, "device": args.device, "dtype": args.dtype,
                                                 **results[-1]})
                sys.stdout.flush()
    print_table(results, ["kind", "prompts", "tokens", "padded", "alone_ms", "together_ms", "together_vs_alone"])
    print_json("serve_prefill", {"machine": machine(), "shape": args.shape, "device": args.device,
                                 "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "results": results})


if __name__ == "__main__":
    main()
