"""A run's curves (flamingo/train/plots.py): metrics.jsonl read back into training and validation rows (a resumed
run's repeated steps: the last record; torn lines skipped and counted), drawn as loss.png and gates.png."""

from __future__ import annotations

import json
import logging
import math

from flamingo.train.plots import plot_run, read_metrics


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


def test_a_series_of_one_point_is_drawn_with_a_marker(tmp_path, monkeypatch):
    """A line through one point draws nothing: a 1-step run's loss.png was empty axes and a legend."""
    import flamingo.train.plots as plots

    real, figures = plots.pyplot(), []

    class KeepFigures:  # pyplot, with the figures kept open for the test to look at
        def __getattr__(self, name):
            return getattr(real, name)

        def close(self, fig):
            figures.append(fig)

    monkeypatch.setattr(plots, "pyplot", lambda: KeepFigures())
    _write(tmp_path / "metrics.jsonl", [_step(1, 3.0, 0.1), {"step": 1, "val_loss/held_out": 2.6}])
    plot_run(str(tmp_path))
    lines = [line for fig in figures for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 2 + 4  # loss/pairs and the validation loss; 2 layers x 2 gates
    assert all(len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", " ", "None") for line in lines)
    for fig in figures:
        real.close(fig)


def test_null_values_read_back_as_nan(tmp_path):
    """run_log.py writes a non-finite number as null (strict JSON); files written before hold a bare NaN."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": null, "loss/pairs": null, "gates": {"0": [null, 0.5]}}\n')
        f.write('{"step": 2, "loss": NaN, "loss/pairs": 2.0}\n')
    training, _ = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert math.isnan(training[0]["loss"]) and math.isnan(training[0]["gates"]["0"][0])
    assert math.isnan(training[1]["loss"]) and training[1]["loss/pairs"] == 2.0
    assert plot_run(str(tmp_path)) == [str(tmp_path / "loss.png"), str(tmp_path / "gates.png")]
