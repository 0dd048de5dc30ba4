"""The demo report's plots: the few-shot metric per task against shots, tanh gate values per layer over training,
and the training loss per dataset."""

from __future__ import annotations

import json
import os
from typing import Any

from .goals import headline
from .run import TASKS, DemoRun
from .sizes import get_size


def plot_fewshot(run: DemoRun, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.6 * len(TASKS), 3.2), squeeze=False)
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
    plt.close(fig)


def training_metrics(run: DemoRun, variant: str) -> list[dict[str, Any]]:
    path = os.path.join(run.settings.out, variant, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            rows[m["step"]] = m
    return [rows[k] for k in sorted(rows)]


def gate_names(run: DemoRun) -> tuple[str, str]:
    """What the logged gate values are: tanh of scalar gates, or the mean |tanh| of vector (per-channel) gates. Every
    variant of a run trains with its size's gate type (demo.train_overrides)."""
    if get_size(run.settings.size).flamingo_gate_type == "vector":
        return "mean |tanh(attention gate)|", "mean |tanh(dense gate)|"
    return "tanh(attention gate)", "tanh(dense gate)"


def plot_training(run: DemoRun, variant: str, gates_path: str, loss_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = training_metrics(run, variant)
    if not rows:
        return
    steps = [m["step"] for m in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for layer in rows[0]["gates"]:
        axes[0].plot(steps, [m["gates"][layer][0] for m in rows], label=f"layer {layer}")
        axes[1].plot(steps, [m["gates"][layer][1] for m in rows], label=f"layer {layer}")
    for ax, name in zip(axes, gate_names(run)):
        ax.set_title(f"{variant}: {name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(gates_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in [k for k in rows[0] if k.startswith("loss/")]:
        ax.plot(steps, [m.get(key) for m in rows], label=key[5:])
    ax.set_title(f"{variant}: training loss per dataset")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(loss_path, dpi=100)
    plt.close(fig)
