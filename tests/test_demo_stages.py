"""`flamingo demo`'s checks and stage folders, without running a stage: a folder the demo did not write is never
deleted (the run is refused before any stage), a relative `--out` is made absolute, a stage whose recorded files are
elsewhere or gone is rebuilt, bad `--shots` are refused up front, and the command reports stage failures, a file
as `--out` and Ctrl-C (also while torchrun runs a stage) in one line each."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import sys

import pytest
import torch

import flamingo_demo.cli as demo_cli
import flamingo_demo.demo as demo_module
from flamingo_demo.demo import checked_shots, config_path, max_shots, run_demo, train_flamingo
from flamingo_demo.probes import token_stream
from flamingo_demo.run import DemoRun, DemoSettings
from flamingo_demo.sizes import get_size
from flamingo_demo.stages import STAGE_FILE, marker_path, reuse_or_build, written_by_demo
from flamingo_demo.tokenizer import grow_tokenizer

KEY = {"size": "smoke", "seed": 0}


class StageRan(Exception):
    """Raised by a stage patched in, so that a test sees the settings a run reached its first stage with."""


@pytest.fixture
def no_stages(monkeypatch):
    """The world stage (the first) raises StageRan with the run's settings: nothing is built. (run_demo sets torch's
    threads: restored after.)"""
    def first_stage(run):
        raise StageRan(run.settings)

    monkeypatch.setattr(demo_module, "build_world", first_stage)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _world_like(directory: str) -> dict:
    """A stage build: writes a file into `directory` and records its name, as the world stage does."""
    path = os.path.join(directory, "data", "pairs.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("{}\n")
    return {"data": {"pairs": {"path": path, "count": 1}}, "kinds": ["circle", "square"]}


def test_a_folder_the_demo_did_not_write_is_refused_before_any_stage_and_kept(tmp_path, no_stages):
    out = tmp_path / "src"
    (out / "flamingo").mkdir(parents=True)
    (out / "flamingo" / "important.py").write_text("my precious code\n")
    (out / "world").mkdir()
    (out / "world" / "notes.txt").write_text("data\n")
    (out / "backbones").mkdir()  # empty: the demo may use it
    with pytest.raises(ValueError, match=r"src already holds world/, flamingo/, not written by the demo"):
        run_demo(DemoSettings(out=str(out), size="smoke", train_procs=1, eval_procs=1))
    assert (out / "flamingo" / "important.py").read_text() == "my precious code\n"
    assert (out / "world" / "notes.txt").read_text() == "data\n"
    with pytest.raises(ValueError, match="gating/"):  # an ablation's folder too
        (out / "flamingo" / "important.py").unlink()
        (out / "world" / "notes.txt").unlink()
        (out / "gating").mkdir()
        (out / "gating" / "mine.txt").write_text("x")
        run_demo(DemoSettings(out=str(out), size="smoke", ablate="gating", train_procs=1, eval_procs=1))
    (out / "gating" / "mine.txt").unlink()
    (out / "eval" / "flamingo").mkdir(parents=True)
    (out / "eval" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="eval/"):
        run_demo(DemoSettings(out=str(out), size="smoke", train_procs=1, eval_procs=1))
    assert (out / "eval" / "thesis.tex").exists()


def test_reuse_or_build_deletes_only_the_demos_folders(tmp_path):
    foreign = tmp_path / "world"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("data\n")
    with pytest.raises(ValueError, match="not written by the demo"):
        reuse_or_build(str(foreign), KEY, lambda: _world_like(str(foreign)))
    assert (foreign / "notes.txt").exists() and not (foreign / "data").exists()

    ours = tmp_path / "backbones"  # what an interrupted stage leaves: its .demo-stage file, no marker
    ours.mkdir()
    (ours / STAGE_FILE).write_text("")
    (ours / "half-written.bin").write_text("x")
    result = reuse_or_build(str(ours), KEY, lambda: _world_like(str(ours)))
    assert not (ours / "half-written.bin").exists() and (ours / STAGE_FILE).exists()
    assert os.path.isfile(result["data"]["pairs"]["path"]) and os.path.isfile(marker_path(str(ours), KEY))
    # a folder an older demo version finished (a marker, no .demo-stage), and the eval folder it left
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / ".done-seed=1-size=smoke.json").write_text("{}")
    assert written_by_demo(str(legacy)) and written_by_demo(str(tmp_path / "missing"))
    (tmp_path / "eval" / "flamingo-gates0").mkdir(parents=True)
    (tmp_path / "eval" / "jobs.json").write_text("[]")
    assert written_by_demo(str(tmp_path / "eval"), demo_module.EVAL_ENTRIES)
    assert not written_by_demo(str(tmp_path / "eval"))


def test_a_stage_whose_recorded_files_are_elsewhere_or_gone_is_rebuilt(tmp_path):
    builds = []

    def build(directory):
        builds.append(directory)
        return _world_like(directory)

    first = str(tmp_path / "demo1" / "world")
    reuse_or_build(first, KEY, lambda: build(first))
    assert reuse_or_build(first, KEY, lambda: build(first))["data"]["pairs"]["path"].startswith(first)
    assert builds == [first]  # reused in place
    copy = str(tmp_path / "demo2" / "world")  # a copied demo folder: its marker names demo1's files
    shutil.copytree(first, copy)
    result = reuse_or_build(copy, KEY, lambda: build(copy))
    assert builds == [first, copy] and result["data"]["pairs"]["path"].startswith(copy)
    moved = str(tmp_path / "demo3" / "world")  # moved: the recorded files are gone
    shutil.move(first, moved)
    reuse_or_build(moved, KEY, lambda: build(moved))
    assert builds[-1] == moved
    relative = str(tmp_path / "demo4" / "world")  # a marker of a run given a relative --out
    os.makedirs(relative)
    with open(marker_path(relative, KEY), "w") as f:
        json.dump({"data": {"pairs": {"path": "rel/world/data/pairs.jsonl"}}}, f)
    reuse_or_build(relative, KEY, lambda: build(relative))
    assert builds[-1] == relative and len(builds) == 4


def test_a_relative_out_is_made_absolute_before_any_stage(tmp_path, monkeypatch, no_stages):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageRan) as ran:
        run_demo(DemoSettings(out="rel", size="smoke", train_procs=1, eval_procs=1))
    settings = ran.value.args[0]
    assert settings.out == str(tmp_path / "rel") and os.path.isabs(settings.out)


def test_a_machine_without_pyav_is_refused_before_any_stage(tmp_path, monkeypatch, no_stages):
    """The world's videos and the video dataset need PyAV: one line naming the install, not a writer's traceback."""
    monkeypatch.setitem(sys.modules, "av", None)  # as if not installed: importing it raises ModuleNotFoundError
    with pytest.raises(ValueError, match=r"the demo's videos need PyAV \(av\): pip install 'flamingo-vlm\[video\]'"):
        run_demo(DemoSettings(out=str(tmp_path), size="smoke", train_procs=1, eval_procs=1))


def test_a_machine_without_the_eval_extra_is_refused_before_any_stage(tmp_path, monkeypatch, no_stages):
    """The captioning task's CIDEr needs pycocoevalcap: one line naming the install, not the eval stage's torchrun
    tracebacks after the world, the backbones and training."""
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ValueError, match=r"the captioning task needs pycocoevalcap \(CIDEr\): pip install "
                                         r"'flamingo-vlm\[eval\]'"):
        run_demo(DemoSettings(out=str(tmp_path), size="smoke", train_procs=1, eval_procs=1))


def test_bad_shots_are_refused_before_any_stage(tmp_path, no_stages):
    smoke = get_size("smoke")
    assert max_shots(smoke) == 8 and checked_shots([4, 0, 0, 4], smoke) == (0, 4)
    eval_dir = tmp_path / "eval" / "flamingo" / "vqa"  # an earlier run's results: not deleted by a refused run
    eval_dir.mkdir(parents=True)
    (eval_dir / "results.json").write_text("{}")
    for shots, message in (((-1,), "between 0 and 8"), ((64,), "between 0 and 8"), ((), "at least one")):
        with pytest.raises(ValueError, match=message):
            run_demo(DemoSettings(out=str(tmp_path), size="smoke", shots=shots, train_procs=1, eval_procs=1))
    assert (eval_dir / "results.json").exists()
    with pytest.raises(StageRan) as ran:
        run_demo(DemoSettings(out=str(tmp_path), size="smoke", shots=(0, 0, 2), train_procs=1, eval_procs=1))
    assert ran.value.args[0].shots == (0, 2)


def _run_with_world(tmp_path, procs: int) -> DemoRun:
    run = DemoRun(DemoSettings(out=str(tmp_path), size="smoke", train_procs=procs))
    kinds = ("interleaved", "pairs", "video", "prompted", "multi")
    run.world = {"data": {kind: {"path": f"{kind}.jsonl"} for kind in kinds}}
    run.backbones = {"vision": {"dir": "vision"}, "lm": {"dir": "lm"}}
    return run


@pytest.mark.parametrize("procs", [1, 2])
def test_the_reproduce_command_runs_from_any_directory(tmp_path, monkeypatch, procs):
    """The report's `flamingo train` line names the config the stage ran by its absolute path (the packaged
    mini.yaml: an installed demo has no configs/ folder), not one relative to where the demo ran."""
    ran = []

    def torchrun(procs, module, args, *, what, hint):  # the stage's command: record its config, train nothing
        ran.append(args[1])
        raise StageRan

    def load(path, overrides):  # the same in this process (one process)
        ran.append(path)
        raise StageRan

    monkeypatch.setattr(demo_module, "run_torchrun", torchrun)
    monkeypatch.setattr(demo_module, "load_config", load)
    monkeypatch.chdir(tmp_path)  # not the checkout: configs/mini.yaml is not here
    run = _run_with_world(tmp_path, procs)
    with pytest.raises(StageRan):
        train_flamingo(run, "flamingo")
    words = shlex.split(run.commands["flamingo"])
    config = words[words.index("train") + 1]
    assert os.path.isabs(config) and config == ran[0] and os.path.samefile(config, config_path())


def test_ctrl_c_during_a_torchrun_stage_is_an_interrupt_not_a_failure(tmp_path, monkeypatch):
    """torchrun exits 1 when Ctrl-C stops it, as a failure would; the demo saw the SIGINT too (its process group),
    so it reports an interrupt, without the `--train-procs 1` hint. SIGINT is ignored here at first, as in a
    background job: torchrun's exit code is then all a run without the fix goes by."""
    def interrupted_torchrun(procs, module, args, *, what, hint):
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C reaches the whole process group
        raise RuntimeError(f"{what} failed with exit code 1 ({hint})")

    monkeypatch.setattr(demo_module, "run_torchrun", interrupted_torchrun)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_flamingo(_run_with_world(tmp_path, 2), "flamingo")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the stage's handler is gone again
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not list(tmp_path.glob("flamingo/.done-*"))

    def failed_torchrun(procs, module, args, *, what, hint):
        raise RuntimeError(f"{what} failed with exit code 1 ({hint})")

    monkeypatch.setattr(demo_module, "run_torchrun", failed_torchrun)  # a real failure keeps its hint
    with pytest.raises(RuntimeError, match="--train-procs 1"):
        train_flamingo(_run_with_world(tmp_path, 2), "flamingo")


def test_ctrl_c_in_an_in_process_flamingo_stage_is_an_interrupt(tmp_path, monkeypatch):
    class InterruptedTrainer:  # Trainer.run after SIGINT: a checkpoint, no final model, returns ""
        stopped_by = signal.SIGINT

        def __init__(self, config):
            pass

        def run(self):
            return ""

    monkeypatch.setattr(demo_module, "Trainer", InterruptedTrainer)
    with pytest.raises(KeyboardInterrupt):
        train_flamingo(_run_with_world(tmp_path, 1), "flamingo")


@pytest.mark.parametrize("raised, code, message", [
    (RuntimeError("the evaluation stage failed with exit code 1"), 2,
     "flamingo demo: error: the evaluation stage failed with exit code 1"),
    (PermissionError(13, "Permission denied"), 2, "flamingo demo: error: [Errno 13] Permission denied"),
    (KeyboardInterrupt(), 130, "flamingo demo: interrupted; rerun the same command to continue"),
])
def test_the_command_reports_failures_and_interrupts_in_one_line(monkeypatch, capsys, raised, code, message):
    def failing(settings):
        raise raised

    monkeypatch.setattr(demo_module, "run_demo", failing)
    try:
        returned = demo_cli.main(["--out", "x", "--size", "smoke", "--no-progress"])
    except (KeyboardInterrupt, RuntimeError, OSError) as e:  # a KeyboardInterrupt would end pytest's run
        returned = f"a {type(e).__name__} traceback"
    assert returned == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("raised", [ValueError("a refused setting"), KeyboardInterrupt()])
def test_the_console_script_names_itself_in_its_failures(monkeypatch, capsys, raised):
    """`flamingo-demo` (argv from sys.argv) said "flamingo demo: error:", a command of another script; its usage
    and argparse's errors already said flamingo-demo."""
    def failing(settings):
        raise raised

    monkeypatch.setattr(demo_module, "run_demo", failing)
    monkeypatch.setattr(sys, "argv", ["/env/bin/flamingo-demo", "--out", "x", "--size", "smoke", "--no-progress"])
    assert demo_cli.main() in (2, 130)
    err = capsys.readouterr().err
    assert err.lstrip().startswith("flamingo-demo: ") and "flamingo demo" not in err


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"not a folder")
    assert demo_cli.main(["--out", str(tmp_path / "a.png"), "--size", "smoke", "--no-progress"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_the_lm_corpus_stream_does_not_warn_about_long_documents(tmp_path):
    """A corpus document longer than the LM's context is cut into windows later: the tokenizer's warning
    ("Token indices sequence length is longer than ...") would read as an error in the backbones stage."""
    lines = ["the red circle is left of the blue square " * 20, "a small text"]
    tokenizer = grow_tokenizer(lines, 300, tmp_path / "tok", model_max_length=16, progress=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # transformers' logger does not propagate: caplog would not see it
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        assert len(token_stream(lines, tokenizer)) > 16
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not [r for r in records if "sequence length is longer" in r.getMessage()]


def test_an_evaluation_rank_stopped_by_ctrl_c_exits_quietly(tmp_path, monkeypatch):
    """Under torchrun Ctrl-C reaches every rank: each exits 130 without a traceback (the demo says it was
    interrupted)."""
    import flamingo_demo.evaluate as evaluate

    def interrupted(job, progress=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run_eval_job", interrupted)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": "flamingo"}]))
    try:
        code = evaluate.main([str(jobs)])
    except KeyboardInterrupt:  # would end pytest's run rather than fail this test
        code = "a KeyboardInterrupt traceback"
    assert code == 130
