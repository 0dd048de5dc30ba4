"""What a run logs is the run's own (flamingo/train/run_log.py): a fresh run moves a previous run's logs aside, a
resumed run drops what the attempt it resumes from logged past its checkpoint (metrics.jsonl's records, TensorBoard's
events), and a skipped first step does not print torch's scheduler-order warning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import pytest

from flamingo.train.config import load_config
from flamingo.train.run_log import RunLog
from flamingo.train.trainer import Trainer

from train_fixtures import nan_losses_after_the_first_step, train_config


def _record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "loss/pairs": loss, "lr": 1e-3, "gates": {"0": (0.0, 0.0)}}


def _steps(output_dir: str) -> list[int]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_a_fresh_run_moves_the_logs_of_a_previous_run_aside(tmp_path, caplog):
    out = str(tmp_path)
    for name in ("metrics.jsonl", "loss.png"):
        (tmp_path / name).write_text("old\n")
    (tmp_path / "tb").mkdir()
    (tmp_path / "metrics.prev-1.jsonl").write_text("older\n")  # N is the first number free for all the logs
    with caplog.at_level(logging.WARNING, logger="flamingo.train.run_log"):
        run_log = RunLog(out, 0, start_step=0)
    run_log.training(_record(1, 3.0))
    run_log.close()
    assert (tmp_path / "metrics.prev-2.jsonl").read_text() == "old\n"
    assert (tmp_path / "loss.prev-2.png").read_text() == "old\n" and (tmp_path / "tb.prev-2").is_dir()
    assert (tmp_path / "metrics.prev-1.jsonl").read_text() == "older\n" and not (tmp_path / "loss.png").exists()
    assert _steps(out) == [1]
    assert "moved to metrics.prev-2.jsonl, tb.prev-2, loss.prev-2.png" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flamingo.train.run_log"):
        RunLog(out, 1, start_step=0).close()  # other ranks touch nothing
    assert _steps(out) == [1] and not caplog.text


def test_a_resumed_run_drops_the_records_past_its_step(tmp_path):
    out = str(tmp_path)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps(_record(step, 3.0)) + "\n")
        f.write(json.dumps({"step": 3, "val_loss/held": 2.0}) + "\n")
        f.write(json.dumps({"step": 4, "val_loss/held": 1.9}) + "\n")
        f.write('{"step": 6, "lo')  # torn by the kill: the next record appended would be glued to it
    run_log = RunLog(out, 0, start_step=3)
    run_log.training(_record(4, 2.5))
    run_log.close()
    assert _steps(out) == [1, 2, 3, 3, 4]  # steps 1-3 and step 3's validation kept, then the resumed run's step 4
    assert json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])["loss"] == 2.5
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path)
    first = RunLog(out, 0, start_step=0)
    for step in range(1, 6):  # killed after step 5, its checkpoint at step 3
        first.training(_record(step, 3.0))
    first.close()
    resumed = RunLog(out, 0, start_step=3)
    for step in range(4, 9):
        resumed.training(_record(step, 2.0))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, 3.0) for s in (1, 2, 3)] + [
        (s, 2.0) for s in range(4, 9)
    ]


def test_a_rerun_without_a_checkpoint_logs_only_its_own_steps(world, one_thread, caplog):
    """A run whose checkpoints were deleted (or that died before its first) is rerun with another lr in the same
    output_dir: its metrics.jsonl and loss.png hold its own steps, the old ones are set aside."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-rerun")
    config = train_config(root, vision, lm, data, steps=3, out=out, interleaved=False, save_every=10)
    Trainer(load_config(config, ["optim.lr=0.05"])).run()
    shutil.rmtree(os.path.join(out, "checkpoints"))
    with caplog.at_level(logging.WARNING, logger="flamingo.train.run_log"):
        Trainer(load_config(config, ["optim.lr=1e-4", "train.steps=2"])).run()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all(r["lr"] <= 1e-4 for r in rows)  # none of lr 0.05's
    assert len(open(os.path.join(out, "metrics.prev-1.jsonl")).readlines()) == 3
    assert "moved to metrics.prev-1.jsonl" in caplog.text


class Killed(Exception):
    pass


def test_a_resumed_run_keeps_no_record_of_the_attempt_past_its_checkpoint(world, one_thread, monkeypatch):
    root, vision, lm, data = world
    out = os.path.join(root, "run-resume-log")
    config = load_config(train_config(root, vision, lm, data, steps=4, out=out, interleaved=False, save_every=2))
    training = RunLog.training

    def dies_after_step_3(self, metrics):
        training(self, metrics)
        if metrics["step"] == 3:
            raise Killed  # killed after logging step 3; its checkpoint is step 2's

    monkeypatch.setattr(RunLog, "training", dies_after_step_3)
    with pytest.raises(Killed):
        Trainer(config).run()
    monkeypatch.setattr(RunLog, "training", training)
    assert _steps(out) == [1, 2, 3]
    Trainer(config).run()  # resumes at step 2
    assert _steps(out) == [1, 2, 3, 4]


def test_a_skipped_first_step_does_not_warn_about_the_scheduler_order(world, one_thread, monkeypatch):
    """A skipped step calls no optimizer.step(); torch then warns at the first scheduler.step() that the schedule's
    first value is skipped, which is not so (the schedule counts steps, skipped or not)."""
    root, vision, lm, data = world
    trainer = Trainer(
        load_config(train_config(root, vision, lm, data, steps=2, out=os.path.join(root, "run-f6"), interleaved=False))
    )
    nan_losses_after_the_first_step(trainer, monkeypatch, from_forward=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train_step()
        trainer.train_step()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert trainer.scheduler.last_epoch == 2


def test_a_run_resumed_from_a_step_0_checkpoint_keeps_its_logs(tmp_path, caplog):
    """A run stopped before its first step leaves a checkpoint of step 0: resumed from it, its logs are its own."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss/held": 2.0}) + "\n")
    with caplog.at_level(logging.WARNING, logger="flamingo.train.run_log"):
        RunLog(str(tmp_path), 0, start_step=0, resumed=True).close()
    assert _steps(str(tmp_path)) == [0] and not (tmp_path / "metrics.prev-1.jsonl").exists() and not caplog.text
