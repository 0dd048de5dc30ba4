"""Evaluation through the server: `flamingo eval --server` wall time per server setting, against the same evaluation
in-process, and whether every setting writes the same predictions.

    python -m bench.serve_eval --model DEMO/flamingo/final --data DEMO/world/eval --vision-cache-mib 0 256 --repeats 2

For each `--vision-cache-mib` value, a fresh `python -m flamingo.cli serve` subprocess (1 torch thread, the default
prefix cache) serves the model and each task runs through it (`flamingo eval --server URL`, one process per task,
as a user runs it); then once in-process. The server's metrics after its tasks give the frames the vision tower ran
on (`vision_frames_computed_total`) of those prompts brought (`vision_frames_total`). A model and data from
`flamingo demo` (its trained model and its world's evaluation sets) make a small real workload: few-shot VQA
(generation) and classification (ranking: one echo request per prompt listing its candidates).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from bench.common import machine, print_json, print_table
from bench.serve import serving


def _eval(args: argparse.Namespace, task: str, out: str, server: str = "") -> float:
    cmd = [sys.executable, "-m", "flamingo.cli", "eval", "--model", args.model, "--task", task, "--data",
           os.path.join(args.data, task), "--shots", *map(str, args.shots), "--trials", "1", "--num-samples",
           str(args.num_samples), "--num-beams", "1", "--batch-size", "16", "--no-progress", "--cider-tokenizer",
           "python", "--demo-separator", "", "--out", out] + (["--server", server] if server else [])
    # (the demo's model reads its demos joined with nothing, as its documents join chunks: flamingo_demo/evaluate.py)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # its own error, not a bare CalledProcessError that hides it
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"flamingo eval --task {task}{' --server ' + server if server else ''} failed "
                         f"(exit {done.returncode}):\n{tail}")
    return time.perf_counter() - start


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^flamingo_{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def run(args: argparse.Namespace, root: str) -> list[dict[str, Any]]:
    rows = []
    for repeat in range(args.repeats):
        for mib in args.vision_cache_mib:
            with serving(["--model", args.model, "--threads", "1", "--vision-cache-mib", str(mib)],
                         stop_timeout=None) as url:
                row: dict[str, Any] = {"setting": f"server, vision cache {mib:g} MiB", "repeat": repeat}
                for task in args.tasks:
                    row[f"{task}_s"] = _eval(args, task, os.path.join(root, f"{task}-{mib:g}-{repeat}"), url)
                metrics = httpx.get(url + "/metrics").text
                frames = _metric(metrics, "vision_frames_total")
                computed = _metric(metrics, "vision_frames_computed_total")
                row["tower_frames"] = f"{computed:g} / {frames:g}" if frames else "all"
            rows.append(row)
        row = {"setting": "in-process", "repeat": repeat}
        for task in args.tasks:
            row[f"{task}_s"] = _eval(args, task, os.path.join(root, f"{task}-local-{repeat}"))
        rows.append(row)
    reference = os.path.join(root, "{task}-local-0")
    for row in rows:
        tag = "local" if row["setting"] == "in-process" else re.search(r"cache (\S+) MiB", row["setting"]).group(1)
        same = True
        for task in args.tasks:
            ours = os.path.join(root, f"{task}-{tag}-{row['repeat']}", "predictions")
            theirs = os.path.join(reference.format(task=task), "predictions")
            same &= all(filecmp.cmp(os.path.join(ours, f), os.path.join(theirs, f), shallow=False)
                        for f in sorted(os.listdir(theirs)))
        row["same_predictions_as_in_process"] = same
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model (e.g. flamingo demo's flamingo/final)")
    parser.add_argument("--data", required=True, help="the directory holding each task's data (flamingo demo's "
                                                      "world/eval)")
    parser.add_argument("--tasks", nargs="+", default=["classification", "vqa"])
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--num-samples", type=int, default=80)
    parser.add_argument("--vision-cache-mib", type=float, nargs="+", default=[0, 256])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"# bench.serve_eval on {machine()}: {args.model}, tasks {args.tasks}, shots {args.shots}")
    with tempfile.TemporaryDirectory() as root:
        rows = run(args, root)
    for row in rows:
        print_json("serve_eval", {"device": machine(), "model": args.model, "shots": args.shots,
                                  "num_samples": args.num_samples, **row})
    print_table(rows, ["setting", "repeat", *[f"{t}_s" for t in args.tasks], "tower_frames",
                       "same_predictions_as_in_process"])


if __name__ == "__main__":
    main()
