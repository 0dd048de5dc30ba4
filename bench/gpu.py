"""The GPU goals' table in one command (issues #8 and #36): training step, decoding at batch 1 and 16 (eager and
compiled) and xattn forward + backward at 4/8/32 images, ours vs the OpenFlamingo peer in one process on the same
weights, then every goal with the measured ratio and whether it is reached.

    python -m bench.gpu --device cuda                            # 1.3B Llama-shaped LM + ViT-L/14 tower, bf16
    python -m bench.gpu --device cuda --parts decode xattn       # some parts only
    python -m bench.gpu --shape tiny --device cpu --repeats 1    # smoke run of this script (no goal is meaningful)

The `gpu` shape on a CPU device (the default `--device` without CUDA) is refused unless `--large-on-cpu` is given.

The parts are the existing benches (bench/train.py, bench/generate.py, bench/xattn.py) called with the issue's
shapes: train 8 x 256 tokens x 5 images, eager, with train.compile's regions and (CUDA) with the frozen tower's
CUDA graphs on top (`--no-compile`: eager only;
`--profile`: kernels per step and device-busy time of each step); decode 8-shot prompts, 20 new tokens, greedy;
xattn T = 2048 text tokens, hidden 2048, visual width 1024. Prints each part's table, then the goals table, and
one JSON line with everything; `--out FILE` also writes that JSON, as each part ends (a later call with other
`--parts` merges in). The train part also prints a `gpu.train.partial` line after each variant but the last and
writes the row so far to `--out` (`unfinished` names the part): a run cut by a time limit keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

import torch

from bench import generate, train, xattn
from bench.common import build_pair, json_safe, machine, parse_args, print_json, print_table
from flamingo.runtime.checkpoint_io import atomic_file
from flamingo.train.config import TrainSection

PARTS = ("train", "decode", "xattn")
# xattn sizes per shape: (text tokens, hidden, visual width). `gpu` is the issue's; `tiny` keeps the smoke run short.
XATTN_SHAPES = {"gpu": (2048, 2048, 1024), "cpu": (2048, 512, 256), "tiny": (128, 64, 32)}


def run_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """After each variant but the last (peer, eager, compiled; then graphed) the row so far goes out as a
    `gpu.train.partial` line and into `--out`: a run cut by its time limit keeps the variants it finished."""
    ns = argparse.Namespace(shape=args.shape, batch=8, tokens=256, images=5, xattn_every=args.xattn_every,
                            profile=args.profile, checkpointing=False, compile=not args.no_compile,
                            vision_graphs=not args.no_compile and args.device.startswith("cuda"),
                            device=args.device, repeats=args.repeats, loss_chunks=TrainSection.loss_chunks)

    def progress(row: dict[str, Any]) -> None:
        print_json("gpu.train.partial", {"shape": args.shape, "device": machine(), **row})
        if args.out:
            _write_partial(args, "train", [row])

    row = train.run(ns, progress)
    print_json("gpu.train", {"shape": args.shape, "device": machine(), **row})
    print_table([row], list(row))
    return [row]


def run_decode(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Eager with the peer, then compiled (static cache + compiled decode step; CUDA graphs on GPU) without it: the
    peer cannot use a static cache, so its eager figures are the reference for both of our rows."""
    bf16 = args.device.startswith("cuda")
    common = dict(shape=args.shape, lm="llama", shots=args.shots, batch=[1, 16], new_tokens=20,
                  xattn_every=args.xattn_every, device=args.device, dtype="bf16" if bf16 else "fp32",
                  repeats=args.repeats, cache="dynamic", xattn_impl=["auto"])
    pair = build_pair(args.shape, xattn_every=args.xattn_every, device=args.device,
                      dtype=torch.bfloat16 if bf16 else torch.float32)  # built once for both modes
    eager = generate.run(argparse.Namespace(**common, compile=False, skip_peer=False), pair)
    compiled = generate.run(argparse.Namespace(**common, compile=True, skip_peer=True), pair)
    rows = []
    for e, c in zip(eager, compiled):
        for mode, r in (("eager", e), ("compiled", c)):
            row = {"mode": mode, "shots": r["shots"], "batch": r["batch"], "ours_decode_tok_s": r["ours_decode_tok_s"],
                   "openflamingo_decode_tok_s": e["openflamingo_decode_tok_s"],
                   "bare_lm_decode_tok_s": r["bare_lm_decode_tok_s"], "ours_ttft_ms": r["ours_ttft_ms"],
                   "openflamingo_ttft_ms": e["openflamingo_ttft_ms"], "same_tokens_as_peer": e["same_tokens_as_peer"]}
            row["decode_vs_openflamingo"] = row["ours_decode_tok_s"] / row["openflamingo_decode_tok_s"]
            row["decode_time_vs_bare_lm"] = row["bare_lm_decode_tok_s"] / row["ours_decode_tok_s"]
            rows.append(row)
    print_table(rows, list(rows[0]))
    return rows


def run_xattn(args: argparse.Namespace) -> list[dict[str, Any]]:
    tokens, dim, dim_visual = XATTN_SHAPES[args.shape]
    ns = argparse.Namespace(images=[4, 8, 32], tokens=tokens, batch=1, dim=dim, dim_visual=dim_visual,
                            impls=["reference", "segments", "flex"], device=args.device,
                            dtype="bf16" if args.device.startswith("cuda") else "fp32", repeats=max(3, args.repeats))
    rows = xattn.run(ns)
    print_table(rows, list(rows[0]))
    return rows


def _best_ours_xattn_ms(row: dict[str, Any]) -> Optional[float]:
    times = [row.get(f"{impl}_ms") for impl in ("segments", "flex")]
    times = [t for t in times if t]
    return min(times) if times else None


def goals(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each goal of issues #8 and #36 that the results can speak to: (goal, measured, target, reached)."""
    out: list[dict[str, Any]] = []

    def add(goal: str, measured: Optional[float], target: float, higher_is_better: bool = True) -> None:
        reached = None if measured is None else (measured >= target if higher_is_better else measured <= target)
        out.append({"goal": goal, "measured": measured, "target": target, "reached": reached})

    if results.get("train"):  # ours: the best of eager, compiled (train.compile) and compiled + tower CUDA graphs
        r = results["train"][0]

        def best(*keys: str, higher: bool = True) -> Optional[float]:
            values = [r[k] for k in keys if r.get(k) is not None]
            return (max(values) if higher else min(values)) if values else None

        add("train samples/s vs OpenFlamingo", best("samples_s_vs_openflamingo", "compiled_samples_s_vs_openflamingo",
                                                    "graphed_samples_s_vs_openflamingo"), 2.5)
        add("train MFU (ours)", best("ours_mfu", "compiled_mfu", "graphed_mfu"), 0.40)
        add("train peak memory vs OpenFlamingo",
            best("peak_memory_vs_openflamingo", "compiled_peak_memory_vs_openflamingo",
                 "graphed_peak_memory_vs_openflamingo", higher=False), 0.7, higher_is_better=False)
    for batch, target in ((1, 10.0), (16, 5.0)):
        rows = [r for r in results.get("decode", []) if r["batch"] == batch and r["shots"] == 8]
        if rows:
            add(f"decode 8-shot batch {batch}: ours (best of eager/compiled) vs OpenFlamingo",
                max(r["decode_vs_openflamingo"] for r in rows), target)
    for r in results.get("xattn", []):
        if r["images"] == 32:
            best = _best_ours_xattn_ms(r)
            ratio = best / r["varlen_ms"] if best and r.get("varlen_ms") else None
            add("xattn fwd+bwd at 32 images: ours (best of segments/flex) vs varlen attention", ratio, 1.2,
                higher_is_better=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpu", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--xattn-every", type=int, default=1)
    parser.add_argument("--shots", type=int, nargs="+", default=[8],
                        help="decode prompts (issue #8 asks 8; issue #3 also 4 and 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="train part: eager only (no train.compile row)")
    parser.add_argument("--profile", action="store_true", help="train part: kernels per step and device-busy time")
    parser.add_argument("--out", default=None, help="JSON file for the results (merged with what it already holds)")
    parser.add_argument("--large-on-cpu", action="store_true",
                        help="build the `gpu` shape on a CPU device anyway (refused without it: tens of GB in fp32)")
    args = parse_args(parser)
    if args.shape == "gpu" and torch.device(args.device).type == "cpu" and not args.large_on_cpu:
        # the default on a machine without CUDA: the 1.3B LM + ViT-L pair in fp32 would exhaust host memory
        parser.error("--shape gpu builds a ~1.3B LM and a ViT-L tower, tens of GB of host memory in fp32, on "
                     f"--device {args.device}: pass --device cuda on a GPU machine, --shape tiny or cpu here, or "
                     "--large-on-cpu to build it anyway")
    print(f"# bench.gpu on {machine()}, shape={args.shape}, parts={' '.join(args.parts)}")
    results, unfinished = _earlier(args.out)  # an earlier call's parts cut by a limit stay marked until rerun
    runners = {"train": run_train, "decode": run_decode, "xattn": run_xattn}
    for part in args.parts:
        print(f"\n## {part}")
        results[part] = runners[part](args)
        unfinished = [p for p in unfinished if p != part]
        if args.out:  # as each part ends: a later part cut by a time limit leaves this one's rows
            _write(args.out, _payload(args, results, unfinished))
    payload = _payload(args, results, unfinished)
    print("\n## goals of issues #8 and #36")
    print_table(payload["goals"], ["goal", "measured", "target", "reached"])
    print_json("gpu", payload)


def _earlier(path: Optional[str]) -> tuple[dict[str, Any], list[str]]:
    """The results an earlier call wrote to `path` (--out), to merge with this call's, and the parts it left
    unfinished (cut by a time limit)."""
    if path and os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        return earlier.get("results", {}), list(earlier.get("unfinished", []))
    return {}, []


def _write_partial(args: argparse.Namespace, part: str, rows: list[dict[str, Any]]) -> None:
    """`part`'s rows so far into --out beside what it holds, the part named `unfinished` (with those an earlier
    call left)."""
    results, unfinished = _earlier(args.out)
    results[part] = rows
    _write(args.out, _payload(args, results, unfinished=sorted({*unfinished, part})))


def _payload(args: argparse.Namespace, results: dict[str, Any], unfinished: Sequence[str] = ()) -> dict[str, Any]:
    """The results file's content; `unfinished`: the parts whose rows are partial (the run was still in them)."""
    payload = {"device": machine(), "shape": args.shape, "torch": torch.__version__, "results": results,
               "goals": goals(results)}
    if unfinished:
        payload["unfinished"] = list(unfinished)
    return payload


def _write(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(payload), f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()
