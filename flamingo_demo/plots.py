"""The demo report's plots: the few-shot metric per task against shots, tanh gate values per layer over training,
and the training loss per dataset."""

from __future__ import annotations

import os
from typing import Any

from flamingo.runtime import figure
from flamingo.train.plots import GATE_NAMES, plot_gates, plot_losses, read_metrics

from .goals import headline
from .run import TASKS, DemoRun
from .sizes import get_size


def plot_fewshot(run: DemoRun, path: str) -> None:
    fig = figure(figsize=(3.6 * len(TASKS), 3.2))
    axes = fig.subplots(1, len(TASKS), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        for variant in run.results:
            xs = [k for k in run.settings.shots if headline(run, variant, task, k) is not None]
            ax.plot(xs, [headline(run, variant, task, k) for k in xs], marker="o", label=variant)
        if task == "binding" and run.world["eval"]["binding"].get("chance"):
            ax.axhline(100 * run.world["eval"]["binding"]["chance"], color="grey", ls="--", lw=1, label="chance")
        ax.set_title(f"{task} ({TASKS[task][1]})")
        ax.set_xlabel("shots")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def training_metrics(run: DemoRun, variant: str) -> list[dict[str, Any]]:
    """A variant's logged training steps, in step order (its validation passes, if any, left out)."""
    path = os.path.join(run.settings.out, variant, "metrics.jsonl")
    return read_metrics(path)[0] if os.path.exists(path) else []


def gate_type(run: DemoRun) -> str:
    """Every variant of a run trains with its size's gate type (demo.train_overrides)."""
    return get_size(run.settings.size).flamingo_gate_type


def gate_names(run: DemoRun) -> tuple[str, str]:
    """What the logged gate values are: tanh of scalar gates, or the mean |tanh| of vector (per-channel) gates."""
    return GATE_NAMES[gate_type(run)]


def plot_training(run: DemoRun, variant: str, gates_path: str, loss_path: str) -> None:
    path = os.path.join(run.settings.out, variant, "metrics.jsonl")
    if not os.path.exists(path):
        return
    training, validation = read_metrics(path)
    if not training:
        return
    plot_gates(training, gates_path, variant, gate_type(run))
    plot_losses(training, validation, loss_path, variant)
