"""Stopping and resuming a run: a signal stops every rank after the same step with one checkpoint and is recorded
(`flamingo train` exits 128 + its number), a second Ctrl-C interrupts, a resumed run applies the config's optimizer
settings and refuses a directory already past train.steps, unfinished checkpoint writes are cleaned up."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

from flamingo.train.config import load_config
from flamingo.train.state import remove_stale_writes
from flamingo.train.trainer import Trainer

from train_fixtures import train_config


def _after_step(trainer: Trainer, hook: Callable[[int], None]) -> None:
    """Call `hook(step)` after each of the trainer's steps."""
    step = trainer.train_step

    def train_step() -> dict[str, Any]:
        metrics = step()
        hook(trainer.step)
        return metrics

    trainer.train_step = train_step  # type: ignore[method-assign]


def test_a_signal_stops_after_the_step_with_one_checkpoint_and_is_recorded(world):
    """SIGTERM after step 2, a save_every step: the run stops there, its checkpoint written once (not again by the
    stop), returns no final model and records the signal for the CLI's exit code."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-sigterm")
    trainer = Trainer(load_config(train_config(root, vision, lm, data, steps=6, out=out, interleaved=False,
                                               save_every=2)))
    _after_step(trainer, lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None)
    saves = []
    save = trainer.save
    trainer.save = lambda: saves.append(trainer.step) or save()  # type: ignore[method-assign]
    assert trainer.run() == ""
    assert trainer.stopped_by == signal.SIGTERM and trainer.step == 2 and saves == [2]
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step_00000002"]
    assert not os.path.exists(os.path.join(out, "final"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler from before the run is back


def test_run_called_again_after_a_stop_goes_on_to_the_end_with_its_own_logs(world):
    """A notebook's interrupt button stops `run()` after step 2; `run()` again on the same trainer trained nothing
    (the stop was never forgotten: "stopped by signal 2" again) and moved the run's own metrics.jsonl aside as
    another run's. It now goes on to train.steps, and metrics.jsonl holds steps 1..4 as one uninterrupted run's."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-continued")
    trainer = Trainer(load_config(train_config(root, vision, lm, data, steps=4, out=out, interleaved=False,
                                               progress=False)))
    _after_step(trainer, lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None)
    assert trainer.run() == "" and trainer.step == 2 and trainer.stopped_by == signal.SIGINT
    assert trainer.run() == os.path.join(out, "final") and trainer.step == 4 and trainer.stopped_by == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [record["step"] for record in map(json.loads, f) if "loss" in record]
    assert steps == [1, 2, 3, 4]
    assert not [name for name in os.listdir(out) if ".prev-" in name]


def test_run_called_again_after_a_step_raised_trains_that_step_on_its_own_batches(world):
    """An exception inside a step (a Ctrl-C a second time, an error in a block's forward), then `run()` again: the
    step's batches, drawn from the sources before the forward, were lost (the sources had moved past them), so the
    run trained other data than an uninterrupted one. They are kept until the step ends: the same weights."""
    root, vision, lm, data = world
    paths = {name: train_config(root, vision, lm, data, steps=3, out=os.path.join(root, f"run-raised-{name}"),
                                interleaved=False, progress=False) for name in ("whole", "raised")}
    whole = Trainer(load_config(paths["whole"]))
    whole.run()
    trainer = Trainer(load_config(paths["raised"]))
    block, raised = trainer.model.xattn[0], []
    forward = block.forward

    def raises_once(*args, **kwargs):  # in step 2's forward
        if trainer.step == 1 and not raised:
            raised.append(1)
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    block.forward = raises_once
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.step == 1
    trainer.run()
    assert trainer.step == 3
    for (name, p), q in zip(trainer.model.named_parameters(), whole.model.parameters()):
        assert torch.equal(p, q), name


def test_a_step_that_raised_after_its_update_is_not_replayed(world):
    """A raise after the optimizer stepped but before the step was counted (a second Ctrl-C, an error in the
    scheduler): `run()` again replayed the step, a second Adam step for every parameter. It is refused; the
    checkpoint resumes the run exactly."""
    root, vision, lm, data = world
    paths = {name: train_config(root, vision, lm, data, steps=3, out=os.path.join(root, f"run-counted-{name}"),
                                interleaved=False, progress=False, save_every=1) for name in ("whole", "raised")}
    whole = Trainer(load_config(paths["whole"]))
    whole.run()
    trainer = Trainer(load_config(paths["raised"]))
    trainer.train_step()
    trainer.save()
    schedule = trainer.scheduler.step

    def raises():
        trainer.scheduler.step = schedule
        raise KeyboardInterrupt

    trainer.scheduler.step = raises
    with pytest.raises(KeyboardInterrupt):
        trainer.train_step()
    with pytest.raises(RuntimeError, match="step 2 stopped after .* trained parameters were stepped, before the step"):
        trainer.run()
    resumed = Trainer(load_config(paths["raised"]))
    assert resumed.step == 1
    resumed.run()
    for (name, p), q in zip(resumed.model.named_parameters(), whole.model.parameters()):
        assert torch.equal(p, q), name


def test_a_run_on_another_thread_trains_and_leaves_the_signal_handlers_alone(world):
    """Signal handlers can be set on the main thread only: `run()` on another thread (a notebook keeping its kernel
    free) failed at once with "signal only works in main thread"."""
    import threading

    root, vision, lm, data = world
    trainer = Trainer(load_config(train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "run-thread"),
                                               interleaved=False, progress=False)))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["final"] = trainer.run()
        except Exception as e:  # the test's to report
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["final"] == os.path.join(root, "run-thread", "final") and trainer.step == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_second_ctrl_c_interrupts(world):
    """The first Ctrl-C asks for a stop after the step; a second one, for a step or a save that does not end, raises
    KeyboardInterrupt as it would without the trainer."""
    root, vision, lm, data = world
    trainer = Trainer(load_config(train_config(root, vision, lm, data, steps=4, out=os.path.join(root, "run-sigint"),
                                               interleaved=False)))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        def twice(step: int) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            assert trainer.stop_signal == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)

        _after_step(trainer, twice)
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
        assert trainer.step == 1
    finally:
        signal.signal(signal.SIGINT, before)


def test_resume_applies_changed_optim_settings_and_refuses_a_directory_past_its_steps(world, caplog):
    """A checkpoint restores the optimizer's own lr and weight decay; the config's new ones now apply from the
    resumed step on (named in a warning). An output_dir already past train.steps is refused (nothing would train and
    final/ would be the longer run's weights); one at it says there is nothing to train."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-reuse")
    path = train_config(root, vision, lm, data, steps=2, out=out, interleaved=False)  # constant lr 1e-3 after warmup
    assert Trainer(load_config(path)).run()
    with pytest.raises(ValueError, match=r"holds a run at step 2 .*past train.steps=1"):
        Trainer(load_config(path, ["train.steps=1"]))
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        Trainer(load_config(path))
    assert "already holds a run at train.steps=2: nothing to train" in caplog.text
    assert "other optimizer settings" not in caplog.text  # the same settings: nothing said, nothing changed
    assert "train.seed" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        Trainer(load_config(path, ["train.seed=5"]))  # the datasets keep their saved order: said, not dropped unsaid
    assert "with train.seed 0 -> 5: the datasets go on in the order they were saved with" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        trainer = Trainer(load_config(path, ["train.steps=4", "optim.lr=1e-5", "optim.weight_decay=0.5",
                                             "schedule.kind=constant"]))
    assert "optim.lr 0.001 -> 1e-05, optim.weight_decay 0.1 -> 0.5" in caplog.text
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-5] * len(groups))
    assert groups[0]["weight_decay"] == 0.5 and trainer.scheduler.base_lrs == pytest.approx([1e-5] * len(groups))
    assert trainer.train_step()["lr"] == pytest.approx(1e-5)
    assert trainer.scheduler.get_last_lr() == pytest.approx([1e-5] * len(groups))


def test_a_resume_that_raises_train_steps_runs_its_first_step_on_the_new_schedule(world):
    """docs/training.md: to train further, raise train.steps. The first resumed step took the lr the finished cosine
    left (0) instead of the new schedule's at that step; every resumed step now logs the new schedule's lr."""
    from flamingo.train.optim import lr_lambda
    from flamingo.train.run_log import materialize

    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=3, out=os.path.join(root, "run-longer"), interleaved=False,
                        progress=False)  # cosine, 2 warmup steps, lr 1e-3
    assert Trainer(load_config(path)).run()
    trainer = Trainer(load_config(path, ["train.steps=6"]))
    schedule = lr_lambda("cosine", 2, 6)
    for step in range(4, 7):
        assert materialize(trainer.train_step())["lr"] == pytest.approx(1e-3 * schedule(step - 1), rel=1e-6)


def test_unfinished_checkpoint_writes_are_removed_when_a_run_starts(world):
    """A run killed while writing a checkpoint leaves `step_*.tmp-<pid>` (a whole checkpoint's size) that nothing
    read or pruned; the next run removes it, and an `.old-` copy whose checkpoint exists. An `.old-` without its
    checkpoint is the only copy of that step: kept."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-stale")
    checkpoints = os.path.join(out, "checkpoints")
    for name in ("step_00000003.tmp-4242", "step_00000001.old-4242", "step_00000002.old-4242", "step_00000001"):
        os.makedirs(os.path.join(checkpoints, name))
    with open(os.path.join(checkpoints, "step_00000001", "state.json"), "w") as f:
        f.write("{}")  # a checkpoint, by its marker
    assert remove_stale_writes(out) == 2
    assert sorted(os.listdir(checkpoints)) == ["step_00000001", "step_00000002.old-4242"]

    shutil.rmtree(os.path.join(checkpoints, "step_00000001"))  # (not a checkpoint the trainer could resume from)
    os.makedirs(os.path.join(checkpoints, "step_00000005.tmp-77"))
    Trainer(load_config(train_config(root, vision, lm, data, steps=1, out=out, interleaved=False)))
    assert sorted(os.listdir(checkpoints)) == ["step_00000002.old-4242"]


_WORKER = """
import json, os, signal, sys
from flamingo.runtime import leave_process_group_and_exit
from flamingo.train.config import load_config
from flamingo.train.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1]))
step = trainer.train_step

def train_step():
    metrics = step()
    if trainer.rank == 1 and trainer.step == 2:  # as on a preempted node: this rank only
        os.kill(os.getpid(), signal.SIGTERM)
    return metrics

trainer.train_step = train_step
out = trainer.run()
with open(os.path.join(trainer.config.train.output_dir, f"rank{trainer.rank}.json"), "w") as f:
    json.dump({"out": out, "step": trainer.step, "stopped_by": trainer.stopped_by}, f)
leave_process_group_and_exit(0)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_every_rank_with_one_checkpoint(world, tmp_path):
    """Only rank 1 gets SIGTERM (a preempted node): both ranks stop after step 2 and write the checkpoint together.
    Acting on the flag alone, rank 1 went into the checkpoint's collectives while rank 0 went on into the next step's:
    the job hung and wrote nothing. (Two processes with torchrun's environment, started here so that a hang can be
    ended process by process.)"""
    root, vision, lm, data = world
    out = str(tmp_path / "run")
    config = train_config(str(tmp_path), vision, lm, data, steps=8, out=out, interleaved=False, save_every=0,
                          progress=False)
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29533"}
    logs = [open(tmp_path / f"rank{rank}.log", "w") for rank in range(2)]
    ranks = [subprocess.Popen([sys.executable, str(worker), config], stdout=logs[rank], stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(2)]
    try:
        codes = [proc.wait(timeout=150) for proc in ranks]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    said = "\n".join((tmp_path / f"rank{rank}.log").read_text()[-1500:] for rank in range(2))
    assert codes == [0, 0], f"the ranks hung or failed after one of them got SIGTERM:\n{said}"
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            assert json.load(f) == {"out": "", "step": 2, "stopped_by": signal.SIGTERM}
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step_00000002"]
    with open(os.path.join(out, "checkpoints", "step_00000002", "state.json")) as f:
        assert len(json.load(f)["data"]) == 2  # both ranks' data positions


def test_a_final_directory_holding_other_files_is_refused_before_step_one(world):
    """The final save refuses files of the user's in an earlier run's final/ (replacing it would delete them): the
    trainer says so when it starts, not after its last step."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-final-notes")
    os.makedirs(os.path.join(out, "final"))
    with open(os.path.join(out, "final", "flamingo_config.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(out, "final", "my_notes.txt"), "w") as f:
        f.write("what this run was")
    with pytest.raises(ValueError, match="my_notes.txt, which no save writes"):
        Trainer(load_config(train_config(root, vision, lm, data, steps=1, out=out, interleaved=False, progress=False)))


@pytest.mark.parametrize("name", ["trained.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
def test_a_damaged_checkpoint_file_is_named_when_the_run_resumes(world, name):
    """A checkpoint file cut short (a copy cut off, a crash before the disk held it): resuming says which file of
    which checkpoint, and how to go on, not safetensors' or json's bare error."""
    root, vision, lm, data = world
    out = os.path.join(root, f"run-damaged-{name}")
    path = train_config(root, vision, lm, data, steps=1, out=out, interleaved=False)
    assert Trainer(load_config(path)).run()
    checkpoint = os.path.join(out, "checkpoints", "step_00000001")
    with open(os.path.join(checkpoint, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(checkpoint, name)) // 2 if name != "state.json" else 0)
    with pytest.raises(ValueError, match=f"{name}' cannot be read .*damaged.*move the directory aside"):
        Trainer(load_config(path, ["train.steps=2"]))
    if name == "state.json":  # read whole, with a field of another type (hand-edited): named too, not a TypeError
        with open(os.path.join(checkpoint, name), "w") as f:
            json.dump({"step": "1"}, f)
        with pytest.raises(ValueError, match="state.json' cannot be read .its step is '1', not a count"):
            Trainer(load_config(path, ["train.steps=2"]))


def test_a_resume_under_another_loss_average_says_so(world, caplog):
    """`train.loss_average` changes what a step's loss is when a step has several passes: a resume under another
    one is named in a warning, and so is one of a run written before state.json held it (which averaged its
    passes' means: `passes`)."""
    root, vision, lm, data = world
    out = os.path.join(root, "run-average")
    path = train_config(root, vision, lm, data, steps=1, out=out, interleaved=False, micro_batches=2)
    assert Trainer(load_config(path)).run()
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        Trainer(load_config(path))
    assert "loss_average" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        Trainer(load_config(path, ["train.steps=2", "train.loss_average=passes"]))
    assert "with train.loss_average tokens -> passes" in caplog.text
    caplog.clear()
    state_path = os.path.join(out, "checkpoints", "step_00000001", "state.json")
    with open(state_path) as f:
        state = json.load(f)
    del state["loss_average"]  # as an older version wrote it
    with open(state_path, "w") as f:
        json.dump(state, f)
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        Trainer(load_config(path, ["train.steps=2"]))
    assert "with train.loss_average passes -> tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flamingo.train.trainer"):
        Trainer(load_config(path, ["train.steps=2", "train.loss_average=passes"]))
    assert "loss_average" not in caplog.text


def test_a_resumes_warnings_name_the_line_that_built_the_trainer(world):
    """A resume under another `train.num_workers` (each dataset restarts its epoch) or with other datasets is said in
    warnings that point at the caller's line, not at the trainer's or the data loader's own."""
    root, vision, lm, data = world
    path = train_config(root, vision, lm, data, steps=1, out=os.path.join(root, "run-workers"))
    assert Trainer(load_config(path)).run()
    with pytest.warns(UserWarning) as said:
        Trainer(load_config(path, ["train.num_workers=2", "data.1.name=pages"]))  # the line they name
    ours = [w for w in said if "train.num_workers" in str(w.message) or "other datasets" in str(w.message)]
    assert {"train.num_workers" in str(w.message) for w in ours} == {True, False}
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, sys._getframe().f_lineno - 3)] * len(ours)
