"""The demo's evaluation stage: jobs (one model, possibly with its gates at 0, on several tasks) run through the real
harness (`flamingo.eval.runner.evaluate`), in this process or in several under torchrun:

    torchrun --standalone --nproc_per_node=2 -m flamingo_demo.evaluate RUN/eval/jobs.json

Under torchrun each rank evaluates its strided share of every task's queries (flamingo/eval/distributed.py) and rank 0
writes each task's results.json, which the demo then reads. A job is plain JSON (built by `flamingo_demo.demo`):

    {"name": "flamingo-gates0", "model_dir": "...", "gates_zero": true, "seed": 0, "batch_size": 16,
     "tasks": [{"name": "binding", "harness_task": "classification", "data_dir": "...", "shots": [4],
                "num_samples": null, "out_dir": "..."}, ...]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch

from flamingo.build import load_pretrained
from flamingo.eval.distributed import rank
from flamingo.eval.runner import RESULTS_FILE, evaluate
from flamingo.runtime import init_process_group_from_env, quiet_transformers
from flamingo.tiny import set_gates


def run_eval_job(job: dict[str, Any], progress: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate one job's model on each of its tasks; returns task name -> the harness's results dict."""
    model, processor = load_pretrained(job["model_dir"])
    model.eval()
    if job["gates_zero"]:  # the same model with every tanh gate at 0: the frozen LM alone
        set_gates(model, 0.0)
    results = {}
    for task in job["tasks"]:
        results[task["name"]] = evaluate(
            model, processor, task["harness_task"], task["data_dir"], shots=task["shots"], trials=1, demos="random",
            query_set="all", num_samples=task["num_samples"], batch_size=job["batch_size"], seed=job["seed"],
            out_dir=task["out_dir"], model_name=job["name"], progress=progress, zero_shot="text",
            demo_separator="")  # the mini world's documents join chunks with nothing (`<|endofchunk|><image>`)
    return results


def read_results(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What `run_eval_job` returned, read back from the results.json files its rank 0 wrote."""
    results = {}
    for task in job["tasks"]:
        path = os.path.join(task["out_dir"], RESULTS_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(f"evaluation of {job['name']} on {task['name']} wrote no {path}")
        with open(path) as f:
            results[task["name"]] = json.load(f)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m flamingo_demo.evaluate JOBS.json [--progress]`: run every job (under torchrun: one share each)."""

    parser = argparse.ArgumentParser(prog="python -m flamingo_demo.evaluate",
                                     description="Run the demo's evaluation jobs.")
    parser.add_argument("jobs", help="a JSON list of jobs (written by flamingo_demo.demo)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    with open(args.jobs) as f:
        jobs = json.load(f)
    quiet_transformers(not args.progress)
    joined = init_process_group_from_env()
    try:
        for job in jobs:
            start = time.perf_counter()
            run_eval_job(job, progress=args.progress)
            if rank() == 0:
                print(f"[eval] {job['name']}: {time.perf_counter() - start:.1f} s", flush=True)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: the demo itself says it was interrupted
        return 130
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
