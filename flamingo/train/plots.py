"""A run's curves as pictures: `loss.png` (training loss per dataset, validation loss dashed) and `gates.png` (each
block's tanh gates over training, the paper's figure), drawn from `metrics.jsonl` (run_log.py). The trainer redraws
them at every checkpoint and at the end; `plot_run(output_dir)` draws them for any run directory, finished or not.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from ..runtime import figure

log = logging.getLogger(__name__)

GATE_NAMES = {"scalar": ("tanh(attention gate)", "tanh(dense gate)"),
              # per-channel gates: their signs differ across channels, so the mean |tanh| says how far they opened
              "vector": ("mean |tanh(attention gate)|", "mean |tanh(dense gate)|")}


def read_metrics(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`metrics.jsonl` -> (training rows, validation rows), each in step order (a step recorded twice: the last
    record). Lines that are not a step's record (a line torn by a killed run) are skipped and counted. A `null`
    (a non-finite number, run_log.py; older files hold a bare NaN, which is read too) is read as NaN."""
    training: dict[int, dict[str, Any]] = {}
    validation: dict[int, dict[str, Any]] = {}
    unreadable = 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "step" not in record:
                unreadable += 1
                continue
            record = _nan_for_null(record)
            if any(k.startswith("val_loss/") for k in record):
                validation[record["step"]] = record
            else:
                training[record["step"]] = record
    if unreadable:
        log.warning("%s: %d line(s) that are no step's record skipped", path, unreadable)
    return [training[s] for s in sorted(training)], [validation[s] for s in sorted(validation)]


def _nan_for_null(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _nan_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_null(v) for v in value]
    return value


def _line(values: list[float], style: dict[str, Any]) -> dict[str, Any]:
    """A series' line style: with a marker on each point that has no finite neighbour. A line draws no segment to or
    from a NaN, so such a point (a 1-step run's, one between skipped steps) would be invisible."""
    finite = [math.isfinite(v) for v in values]
    lone = [i for i, f in enumerate(finite)
            if f and not (i > 0 and finite[i - 1]) and not (i + 1 < len(finite) and finite[i + 1])]
    return style if not lone or "marker" in style else {**style, "marker": ".", "markevery": lone}


def plot_losses(training: list[dict[str, Any]], validation: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Training loss per dataset (solid) and validation loss per dataset (dashed) against the step."""
    fig = figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    for records, prefix, style, suffix in ((training, "loss/", {}, ""),
                                           (validation, "val_loss/", {"ls": "--", "marker": "."}, " (validation)")):
        for key in dict.fromkeys(k for r in records for k in r if k.startswith(prefix)):  # one line per dataset
            rows = [r for r in records if key in r]
            values = [r[key] for r in rows]
            ax.plot([r["step"] for r in rows], values, label=key[len(prefix):] + suffix, **_line(values, style))
    ax.set_title(f"{title}: loss" if title else "loss")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_gates(training: list[dict[str, Any]], path: str, title: str = "", gate_type: str = "scalar") -> None:
    """Each block's attention and dense gates against the step, one line per LM layer it sits before (rows need not
    all have the same layers: a layer's line has a gap where a row lacks it)."""
    rows = [r for r in training if r.get("gates")]
    fig = figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    steps = [r["step"] for r in rows]
    missing = (math.nan, math.nan)
    for layer in dict.fromkeys(layer for r in rows for layer in r["gates"]):
        for i, ax in enumerate(axes):  # 0: attention gate, 1: dense gate
            values = [r["gates"].get(layer, missing)[i] for r in rows]
            ax.plot(steps, values, label=f"layer {layer}", **_line(values, {}))
    for ax, name in zip(axes, GATE_NAMES[gate_type]):
        ax.set_title(f"{title}: {name}" if title else name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if rows:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_run(output_dir: str, gate_type: str = "scalar", title: str = "") -> list[str]:
    """Draw `loss.png` and `gates.png` in `output_dir` from its `metrics.jsonl`; returns the files written (none
    without metrics yet, or without matplotlib, which is then said once in the log)."""
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        return []
    try:
        figure()  # whether matplotlib imports (the empty figure is dropped)
    except ImportError:
        log.info("matplotlib is not installed: no loss.png / gates.png (the curves are in metrics.jsonl)")
        return []
    training, validation = read_metrics(metrics)
    if not training and not validation:
        return []
    written = [os.path.join(output_dir, "loss.png")]
    plot_losses(training, validation, written[0], title)
    if any(r.get("gates") for r in training):
        written.append(os.path.join(output_dir, "gates.png"))
        plot_gates(training, written[1], title, gate_type)
    return written
