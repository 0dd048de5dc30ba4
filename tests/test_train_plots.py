"""A run's curves (flamingo/train/plots.py): metrics.jsonl read back into training and validation rows (a resumed
run's repeated steps: the last record; torn lines skipped and counted), drawn as loss.png and gates.png."""

from __future__ import annotations

import json
import logging
import math
import os

from flamingo.train import trainer as trainer_module
from flamingo.train.config import load_config
from flamingo.train.plots import plot_run, read_metrics

from train_fixtures import train_config


def _write(path, records, torn=False):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write('{"step": 9, "lo')


def _step(step, loss, gate):
    return {"step": step, "loss": loss, "loss/pairs": loss, "lr": 1e-4, "gates": {"0": [gate, -gate], "2": [gate, 0.0]}}


def test_metrics_are_read_back_by_kind_and_step(tmp_path, caplog):
    records = [_step(1, 3.0, 0.0), _step(2, 2.5, 0.1), {"step": 2, "val_loss/held_out": 2.7, "val_tokens/held_out": 9},
               _step(3, 2.4, 0.2), _step(2, 2.6, 0.15), _step(3, 2.3, 0.25)]  # resumed after step 1: 2 and 3 again
    _write(tmp_path / "metrics.jsonl", records, torn=True)
    with caplog.at_level(logging.WARNING):
        training, validation = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in training] == [(1, 3.0), (2, 2.6), (3, 2.3)]
    assert [(r["step"], r["val_loss/held_out"]) for r in validation] == [(2, 2.7)]
    assert "1 line(s) that are no step's record skipped" in caplog.text


def test_plot_run_draws_loss_and_gates(tmp_path):
    assert plot_run(str(tmp_path)) == []  # no metrics yet: nothing drawn
    _write(tmp_path / "metrics.jsonl", [_step(s, 3.0 - 0.1 * s, 0.05 * s) for s in range(1, 6)]
           + [{"step": 5, "val_loss/held_out": 2.6}])
    written = plot_run(str(tmp_path), gate_type="vector", title="run")
    assert written == [str(tmp_path / "loss.png"), str(tmp_path / "gates.png")]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _kept_figures(monkeypatch):
    """The figures the plots draw (those with axes: plot_run's check for matplotlib makes an empty one), kept in a
    list for the test to look at."""
    import flamingo.train.plots as plots

    real, made = plots.figure, []

    def keep(**kwargs):
        made.append(real(**kwargs))
        return made[-1]

    monkeypatch.setattr(plots, "figure", keep)
    return made


def _drawn(made):
    return [fig for fig in made if fig.axes]


def test_a_series_of_one_point_is_drawn_with_a_marker(tmp_path, monkeypatch):
    """A line through one point draws nothing: a 1-step run's loss.png was empty axes and a legend."""
    made = _kept_figures(monkeypatch)
    _write(tmp_path / "metrics.jsonl", [_step(1, 3.0, 0.1), {"step": 1, "val_loss/held_out": 2.6}])
    plot_run(str(tmp_path))
    figures = _drawn(made)
    lines = [line for fig in figures for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 2 + 4  # loss/pairs and the validation loss; 2 layers x 2 gates
    assert all(len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", " ", "None") for line in lines)


def test_null_values_read_back_as_nan(tmp_path):
    """run_log.py writes a non-finite number as null (strict JSON); files written before hold a bare NaN."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": null, "loss/pairs": null, "gates": {"0": [null, 0.5]}}\n')
        f.write('{"step": 2, "loss": NaN, "loss/pairs": 2.0}\n')
    training, _ = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert math.isnan(training[0]["loss"]) and math.isnan(training[0]["gates"]["0"][0])
    assert math.isnan(training[1]["loss"]) and training[1]["loss/pairs"] == 2.0
    assert plot_run(str(tmp_path)) == [str(tmp_path / "loss.png"), str(tmp_path / "gates.png")]


def test_a_point_between_skipped_steps_is_drawn_with_a_marker(tmp_path, monkeypatch):
    """A line draws no segment to or from a NaN: a finite loss between skipped (null) steps was invisible."""
    made = _kept_figures(monkeypatch)
    nan = math.nan
    losses = {"alone": [nan, nan, 2.0, nan], "torn": [3.0, 2.9, nan, 2.7, nan], "whole": [3.0, 2.9, 2.8, 2.7]}
    rows = [{"step": s + 1, **{f"loss/{k}": v[s] for k, v in losses.items() if s < len(v)},
             "gates": {"0": [0.1 * s, nan if s in (1, 3) else 0.2]}} for s in range(5)]
    _write(tmp_path / "metrics.jsonl", rows)
    plot_run(str(tmp_path))
    loss, gates = _drawn(made)
    marked = {line.get_label(): line.get_markevery() for line in loss.axes[0].get_lines()
              if line.get_marker() not in (None, "", " ", "None")}
    assert marked == {"alone": [2], "torn": [3]}  # only the lone points; a whole line has no markers
    attn, dense = (ax.get_lines()[0] for ax in gates.axes)
    assert attn.get_marker() in (None, "", " ", "None") and dense.get_markevery() == [0, 2, 4]


def test_rows_with_other_gate_layers_are_drawn(tmp_path):
    """Records whose blocks sit before other layers (an output_dir reused with another xattn_every) draw one line
    per layer, with gaps where a row lacks it."""
    _write(tmp_path / "metrics.jsonl", [_step(1, 3.0, 0.1), {"step": 2, "loss": 2.9, "gates": {"1": [0.2, 0.1]}},
                                        _step(3, 2.8, 0.3)])
    assert plot_run(str(tmp_path)) == [str(tmp_path / "loss.png"), str(tmp_path / "gates.png")]


def test_a_plotting_error_does_not_end_the_run(world, one_thread, monkeypatch, caplog):
    """A picture never costs the run: plot_run raising at every checkpoint still leaves a trained final/."""

    def broken(*args, **kwargs):
        raise KeyError("0")

    root, vision, lm, data = world
    monkeypatch.setattr(trainer_module, "plot_run", broken)
    config = load_config(train_config(root, vision, lm, data, steps=2, out=os.path.join(root, "run-plot-error"),
                                      interleaved=False, save_every=1))
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        out = trainer_module.Trainer(config).run()
    assert os.path.isfile(os.path.join(out, "train_config.json"))
    assert "could not draw loss.png / gates.png: KeyError" in caplog.text
