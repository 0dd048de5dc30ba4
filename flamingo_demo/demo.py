"""`flamingo demo`: grow a mini Flamingo end to end, offline, and show few-shot learning.

Stages (each timed, each with a progress bar, each reusing its output when it is already there; stages.py says when a
stage folder is reused, rebuilt, or refused as not the demo's):
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
import shlex
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from typing import Any, Iterator, Optional, Sequence

import torch
import yaml

from flamingo.config import CONFIG_NAME
from flamingo.eval.extras import check_requirements
from flamingo.eval.tasks import TASKS as EVAL_TASKS
from flamingo.runtime import run_torchrun, torchrun_command
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer
from flamingo.video import import_av

from .backbones import grow_backbones
from .build_world import write_world
from .evaluate import read_results, run_eval_job
from .report import write_report
from .run import ABLATIONS, EVAL_SETS, SHOTS, TASK_SHOTS, TASKS, DemoRun, DemoSettings
from .sizes import MiniSize, get_size
from .stages import check_out, claim, reuse_or_build
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


@contextmanager
def interrupts_recorded() -> Iterator[list[int]]:
    """While a stage's processes run, a Ctrl-C (SIGINT) is recorded instead of raised: the demo waits for torchrun to
    stop its workers (the trainer's checkpoint on the way out) and then reports an interrupt, whatever exit code
    torchrun gave. A second Ctrl-C raises at once. Off the main thread (no signal handlers there), nothing is
    recorded."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def record(signum: int, frame: Any) -> None:
        if seen:
            raise KeyboardInterrupt
        seen.append(signum)

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def run_processes(procs: int, module: str, args: Sequence[str], *, what: str, hint: str) -> None:
    """`run_torchrun`, with an interrupt reported as KeyboardInterrupt (the CLI's "interrupted; rerun"), not as a
    failed stage with `hint`: torchrun exits 1 when Ctrl-C stops it, like a failure would."""
    with interrupts_recorded() as seen:
        try:
            run_torchrun(procs, module, args, what=what, hint=hint)
        except RuntimeError:
            if seen:
                raise KeyboardInterrupt from None
            raise
    if seen:  # the workers finished as the signal came: the stage is redone by the rerun
        raise KeyboardInterrupt


def launcher(procs: int) -> list[str]:
    """The command line that runs `flamingo train` in `procs` processes (as the report prints it)."""
    return ["flamingo", "train"] if procs == 1 else torchrun_command(procs, "flamingo.cli", ["train"])


def train_flamingo(run: DemoRun, variant: str) -> str:
    """Stage 3 through the trainer `flamingo train` runs (under torchrun for several processes); returns the final
    model directory."""
    s = run.settings
    overrides = train_overrides(run, variant)
    config = os.path.abspath(config_path())  # the reproduce command works from any directory
    run.commands[variant] = shlex.join(launcher(s.train_procs) + [config] + overrides)
    if not s.progress:  # not part of the reproduce command: it only silences the bar
        overrides = overrides + ["train.progress=false"]
    out = os.path.join(s.out, variant)

    def build() -> str:
        if s.train_procs == 1:
            trainer = Trainer(load_config(config, overrides))
            if not trainer.run() and trainer.stopped_by == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C: no final model and no marker, so the rerun redoes the stage
        else:  # one thread per rank: the demo's 2 threads split
            run_processes(s.train_procs, "flamingo.cli", ["train", config, *overrides],
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


# What the `eval/` folder holds: jobs.json and one folder per job (a variant, and the gate-0 baseline).
EVAL_ENTRIES = frozenset(["jobs.json", *(name + suffix for name in ("flamingo", *ABLATIONS)
                                          for suffix in ("", "-gates0"))])


def evaluate_models(run: DemoRun, jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stage 4: every job through the real harness; returns job name -> task -> results. With `eval_procs` > 1 the
    jobs run under torchrun, each process with one thread and a strided share of every task's queries (one launch
    for all jobs: each process loads torch once)."""
    s = run.settings
    claim(os.path.join(s.out, "eval"), EVAL_ENTRIES, fresh=False)  # earlier runs' other jobs stay
    if s.eval_procs == 1:
        return {job["name"]: run_eval_job(job, progress=s.progress) for job in jobs}
    path = os.path.join(s.out, "eval", "jobs.json")
    with open(path, "w") as f:
        json.dump(jobs, f, indent=1)
    for job in jobs:  # a stale results.json from an earlier run must not pass for this one's
        for task in job["tasks"]:
            shutil.rmtree(task["out_dir"], ignore_errors=True)
    run_processes(s.eval_procs, "flamingo_demo.evaluate", [path] + (["--progress"] if s.progress else []),
                  what="the evaluation stage", hint="`--eval-procs 1` evaluates in this process, without torchrun")
    return {job["name"]: read_results(job) for job in jobs}


def max_shots(size: MiniSize) -> int:
    """The most shots every task of `size` can draw: the smallest demo pool (train split) of the tasks that draw
    demos at random, a binding episode's demos per word, and the demo's largest setting (`SHOTS`). The multi-image
    tasks run at their own shots (`TASK_SHOTS`)."""
    return min(max(SHOTS), size.binding_shots, size.vqa[0], size.captioning[0], size.classification[0],
               size.videoqa[0])


def checked_shots(shots: Sequence[int], size: MiniSize) -> tuple[int, ...]:
    """`shots` sorted without repeats (a repeat would be a second, identical column of the report), refused unless
    each is in 0..max_shots(size): checked before any stage runs, not by the harness after three stages."""
    unique = sorted({int(k) for k in shots})
    if not unique:
        raise ValueError("--shots needs at least one number of shots")
    most = max_shots(size)
    if unique[0] < 0 or unique[-1] > most:
        raise ValueError(f"--shots must be between 0 and {most} for the {size.name!r} size (its smallest demo pool "
                         f"and the demo's largest setting), got {list(shots)}")
    return tuple(unique)


def stage_folders(settings: DemoSettings) -> dict[str, frozenset[str]]:
    """The folders of `settings.out` a run deletes or writes into -> the entries `written_by_demo` accepts in one
    that older demo versions left without a `.demo-stage` file."""
    variants = ["flamingo"] + ([settings.ablate] if settings.ablate else [])
    return {**{name: frozenset() for name in ("world", "backbones", *variants)}, "eval": EVAL_ENTRIES}


def run_demo(settings: DemoSettings) -> DemoRun:
    """All stages; returns what the report is made of (report.md is written into settings.out). Every setting and
    `--out` itself are checked before any stage runs (`check_out`: no folder the demo did not write is replaced)."""
    if settings.seed < 0:  # numpy's error would come from inside the world stage, without naming the option
        raise ValueError(f"--seed must be >= 0 (numpy's seeds are non-negative), got {settings.seed}")
    if settings.ablate is not None and settings.ablate not in ABLATIONS:
        raise ValueError(f"unknown ablation {settings.ablate!r}: choose from {sorted(ABLATIONS)}")
    size = get_size(settings.size)
    if settings.ablate == "xattn-every-4" and size.lm_layers < 4:  # refused here, not by the trainer after two stages
        raise ValueError(f"--ablate xattn-every-4 needs an LM of 4 layers or more: the {settings.size!r} size's "
                         f"LM has {size.lm_layers}, so no cross-attention block would be left")
    for name in ("train_procs", "eval_procs"):
        procs = getattr(settings, name)
        if procs < 0:
            raise ValueError(f"{name} must be >= 0 (0: automatic), got {procs}")
        if procs == 0:
            settings = replace(settings, **{name: default_procs()})
    per_rank_batches(settings.train_procs)  # a batch that does not split fails here, not after two stages
    try:  # the world's videos and the video dataset: refused here, not from inside a world writer's process
        import_av()
    except ImportError as e:
        raise ValueError(f"the demo's {e}") from e
    # the evaluation's packages (CIDEr's pycocoevalcap) too: refused here, not by the eval stage's ranks after training
    for harness_task in dict.fromkeys(harness for harness, _ in TASKS.values()):
        check_requirements(EVAL_TASKS[harness_task])
    # absolute once: the stage markers and the train command record file names that a rerun from another working
    # directory must still find
    settings = replace(settings, out=os.path.abspath(settings.out), shots=checked_shots(settings.shots, size))
    check_out(settings.out, stage_folders(settings))
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
