"""`flamingo demo`: grow a mini Flamingo end to end, offline, and show few-shot learning.

Stages (each timed, each with a progress bar, each reusing its output when it is already there):
1. world      — the synthetic multimodal world (world.py, texts.py, writers.py) in the data/eval formats;
2. backbones  — a BPE tokenizer, a contrastively pretrained vision tower, a small causal LM (backbones.py),
                saved as HF directories and loaded back through `from_pretrained`;
3. flamingo   — `flamingo train configs/mini.yaml ...`: both backbones frozen, the weighted mixture (interleaved, pairs,
                video, prompted pairs) with lambda weights; on a machine with 2 cores or more, two DDP processes of one
                thread each (`torchrun`), each with half of every batch;
4. eval       — the real harness (flamingo/eval) at 0/1/2/4/8 shots on held-out images and combinations, for the
                trained model and the same model with its gates at 0 (evaluate.py); on a machine with 2
                cores or more, two processes of one thread each (`torchrun`), each with half of every task's queries;
5. generate   — few-shot prompts written by hand, through the library's API as `flamingo generate` runs them
                (tryit.py);
6. report     — report.md with the few-shot table, the goals, plots, gate values over training, sample generations.
`--ablate X` reruns stages 3-4 with one of the paper's ablations and adds its rows to the report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import yaml

from flamingo.config import CONFIG_NAME
from flamingo.runtime import run_torchrun, torchrun_command
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer

from .backbones import grow_backbones
from .build_world import write_world
from .evaluate import read_results, run_eval_job
from .report import write_report
from .run import ABLATIONS, EVAL_SETS, TASK_SHOTS, TASKS, DemoRun, DemoSettings
from .sizes import get_size
from .tryit import run_hand_prompts


def default_procs() -> int:
    """Two processes of one thread each train and evaluate the mini Flamingo faster than one process of two threads
    on 2 cores, with identical evaluation predictions (docs/demo.md has the timings)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def config_path() -> str:
    """configs/mini.yaml (shipped inside the package as flamingo_demo/mini.yaml)."""
    return str(resources.files("flamingo_demo").joinpath("mini.yaml"))


@contextmanager
def stage(run: DemoRun, name: str) -> Iterator[None]:
    start = time.perf_counter()
    print(f"[demo] {name} ...", flush=True)
    yield
    run.times[name] = round(time.perf_counter() - start, 1)
    print(f"[demo] {name} done in {run.times[name]:.1f} s", flush=True)


def reuse_or_build(directory: str, key: dict[str, Any], build: Callable[[], Any],
                   reused: Optional[list[str]] = None) -> Any:
    """A stage's result, rebuilt unless `directory` holds one made with the same `key` (size, seed); a reused
    directory's name is appended to `reused`.

    The result (JSON) is written last, into the marker file, so an interrupted stage is redone, never half-reused."""
    marker = os.path.join(directory, ".done-" + "-".join(f"{k}={v}" for k, v in sorted(key.items())) + ".json")
    if os.path.exists(marker):
        if reused is not None:
            reused.append(os.path.basename(os.path.normpath(directory)))
        with open(marker) as f:
            return json.load(f)
    shutil.rmtree(directory, ignore_errors=True)
    result = build()
    os.makedirs(directory, exist_ok=True)
    with open(marker, "w") as f:
        json.dump(result, f)
    return result


def build_world(run: DemoRun) -> dict[str, Any]:
    s = run.settings
    root = os.path.join(s.out, "world")
    return reuse_or_build(root, {"size": s.size, "seed": s.seed},
                          lambda: write_world(root, s.size, s.seed, progress=s.progress), run.reused)


def build_backbones(run: DemoRun) -> dict[str, Any]:
    s = run.settings
    root = os.path.join(s.out, "backbones")
    return reuse_or_build(root, {"size": s.size, "seed": s.seed},
                          lambda: grow_backbones(run.world, root, s.size, seed=s.seed, progress=s.progress),
                          run.reused)


def train_overrides(run: DemoRun, variant: str) -> list[str]:
    s, size = run.settings, get_size(run.settings.size)
    data = run.world["data"]
    overrides = [f"model.vision={run.backbones['vision']['dir']}", f"model.lm={run.backbones['lm']['dir']}",
                 f"data.0.path={data['interleaved']['path']}", f"data.1.path={data['pairs']['path']}",
                 f"data.2.path={data['video']['path']}", f"data.3.path={data['prompted']['path']}",
                 f"data.4.path={data['multi']['path']}",
                 f"train.output_dir={os.path.join(s.out, variant)}",
                 f"train.seed={s.seed}", f"train.steps={size.flamingo_steps}"]
    if size.flamingo_gate_type != "scalar":
        overrides.append(f"model.flamingo.gate_type={size.flamingo_gate_type}")
    if variant != "flamingo":
        overrides += ABLATIONS[variant]
    return overrides + per_rank_batches(s.train_procs)


def per_rank_batches(procs: int) -> list[str]:
    """Overrides that keep configs/mini.yaml's batches global when `procs` ranks split them (a dataset's batch_size
    is per rank)."""
    if procs == 1:
        return []
    with open(config_path()) as f:
        datasets = yaml.safe_load(f)["data"]
    overrides = []
    for i, d in enumerate(datasets):
        if d["batch_size"] % procs:
            raise ValueError(f"configs/mini.yaml: the batch of dataset {d['name']!r} ({d['batch_size']}) does not "
                             f"split over {procs} processes")
        overrides.append(f"data.{i}.batch_size={d['batch_size'] // procs}")
    return overrides


def launcher(procs: int) -> list[str]:
    """The command line that runs `flamingo train` in `procs` processes (as the report prints it)."""
    return ["flamingo", "train"] if procs == 1 else torchrun_command(procs, "flamingo.cli", ["train"])


def train_flamingo(run: DemoRun, variant: str) -> str:
    """Stage 3 through the trainer `flamingo train` runs (under torchrun for several processes); returns the final
    model directory."""
    s = run.settings
    overrides = train_overrides(run, variant)
    run.commands[variant] = " ".join(launcher(s.train_procs) + ["configs/mini.yaml"] + overrides)
    if not s.progress:  # not part of the reproduce command: it only silences the bar
        overrides = overrides + ["train.progress=false"]
    out = os.path.join(s.out, variant)

    def build() -> str:
        if s.train_procs == 1:
            Trainer(load_config(config_path(), overrides)).run()
        else:  # one thread per rank: the demo's 2 threads split
            run_torchrun(s.train_procs, "flamingo.cli", ["train", config_path(), *overrides],
                         what=f"the Flamingo stage ({variant})",
                         hint="`--train-procs 1` trains in this process, without torchrun")
        final = os.path.join(out, "final")
        if not os.path.isfile(os.path.join(final, CONFIG_NAME)):  # stopped by a signal: no final model,
            # and no stage marker either, so that a rerun redoes the stage instead of reusing a missing model
            raise RuntimeError(f"the Flamingo stage ({variant}) stopped before its last step; rerun the demo to "
                               "redo it")
        return final

    return reuse_or_build(out, {"size": s.size, "seed": s.seed, "procs": s.train_procs}, build, run.reused)


def gate_zero_shots(shots: Sequence[int]) -> list[int]:
    """The gate-0 baseline runs at the demo's 4-shot setting only (the goal compares there; it halves eval time)."""
    return [4] if 4 in shots else [max(shots)]


def eval_job(run: DemoRun, variant: str, model_dir: str, *, gates_zero: bool = False,
             shots: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """One model's evaluation on every task of the demo, as plain JSON for evaluate.py."""
    s, size = run.settings, get_size(run.settings.size)
    name = variant + ("-gates0" if gates_zero else "")
    # Binding is evaluated on all of its episodes (one query each): at 80 queries its standard error near 90% would be
    # too coarse for the goals (>= 90%, no fall with shots).
    tasks = [{"name": task_name, "harness_task": harness_task,
              "data_dir": run.world["eval"][EVAL_SETS.get(task_name, task_name)]["dir"],
              "shots": [int(k) for k in (shots or s.shots) if int(k) in TASK_SHOTS.get(task_name, (int(k),))],
              "num_samples": None if task_name == "binding" else size.eval_samples,
              "out_dir": os.path.join(s.out, "eval", name, task_name)}
             for task_name, (harness_task, _) in TASKS.items()]
    tasks = [t for t in tasks if t["shots"]]
    return {"name": name, "model_dir": model_dir, "gates_zero": gates_zero, "seed": s.seed, "batch_size": 16,
            "tasks": tasks}


def evaluate_models(run: DemoRun, jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stage 4: every job through the real harness; returns job name -> task -> results. With `eval_procs` > 1 the
    jobs run under torchrun, each process with one thread and a strided share of every task's queries (one launch
    for all jobs: each process loads torch once)."""
    s = run.settings
    if s.eval_procs == 1:
        return {job["name"]: run_eval_job(job, progress=s.progress) for job in jobs}
    path = os.path.join(s.out, "eval", "jobs.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(jobs, f, indent=1)
    for job in jobs:  # a stale results.json from an earlier run must not pass for this one's
        for task in job["tasks"]:
            shutil.rmtree(task["out_dir"], ignore_errors=True)
    run_torchrun(s.eval_procs, "flamingo_demo.evaluate", [path] + (["--progress"] if s.progress else []),
                 what="the evaluation stage", hint="`--eval-procs 1` evaluates in this process, without torchrun")
    return {job["name"]: read_results(job) for job in jobs}


def run_demo(settings: DemoSettings) -> DemoRun:
    """All stages; returns what the report is made of (report.md is written into settings.out)."""
    if settings.ablate is not None and settings.ablate not in ABLATIONS:
        raise ValueError(f"unknown ablation {settings.ablate!r}: choose from {sorted(ABLATIONS)}")
    layers = get_size(settings.size).lm_layers
    if settings.ablate == "xattn-every-4" and layers < 4:  # refused here, not by the trainer after two stages
        raise ValueError(f"--ablate xattn-every-4 needs an LM of 4 layers or more: the {settings.size!r} size's "
                         f"LM has {layers}, so no cross-attention block would be left")
    for name in ("train_procs", "eval_procs"):
        procs = getattr(settings, name)
        if procs < 0:
            raise ValueError(f"{name} must be >= 0 (0: automatic), got {procs}")
        if procs == 0:
            settings = replace(settings, **{name: default_procs()})
    per_rank_batches(settings.train_procs)  # a batch that does not split fails here, not after two stages
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(settings.out, exist_ok=True)
    run = DemoRun(settings)
    total = time.perf_counter()
    with stage(run, "world"):
        run.world = build_world(run)
    with stage(run, "backbones"):
        run.backbones = build_backbones(run)
    variants = ["flamingo"] + ([settings.ablate] if settings.ablate else [])
    for variant in variants:
        with stage(run, f"train {variant}"):
            run.models[variant] = train_flamingo(run, variant)
    jobs = [eval_job(run, variant, run.models[variant]) for variant in variants]
    jobs.append(eval_job(run, "flamingo", run.models["flamingo"], gates_zero=True,
                         shots=gate_zero_shots(settings.shots)))
    with stage(run, "eval"):
        run.results = evaluate_models(run, jobs)
    with stage(run, "generate"):  # few-shot prompts written by hand, as `flamingo generate` runs them
        run.generations = run_hand_prompts(run.world, run.models["flamingo"], os.path.join(settings.out, "generate"),
                                           seed=settings.seed)
    run.times["total"] = round(time.perf_counter() - total, 1)  # the report itself (about a second) is not counted

    with stage(run, "report"):
        path = write_report(run)
    print(f"[demo] report: {path}  (total {run.times['total']:.0f} s)")
    return run
