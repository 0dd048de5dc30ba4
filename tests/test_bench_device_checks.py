"""bench/device_checks.sh and the benches its parts run: a part cut by its time limit leaves the JSON lines it printed
(and the benches print them per variant or as soon as ours is timed), a part's limit never runs past the call's,
the `tests` part runs every CUDA test file even when one cannot be collected, and versions.txt names the commit
also in a copy without .git."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_checks.sh"


def _source(commands: str, env: dict[str, str] | None = None, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    """`commands` in bash after sourcing the script (its functions, no subcommand run)."""
    return subprocess.run(["bash", "-c", f'source "{script}"\n{commands}'], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_part_cut_by_its_limit_leaves_its_json_lines(tmp_path):
    command = tmp_path / "slow.sh"
    command.write_text('echo \'{"bench": "demo", "n": 1}\'\necho "a table line"\nsleep 20\n'
                       'echo \'{"bench": "demo", "n": 2}\'\n')
    out = _source(f"part demo 1 bash {command}", {"OUT": str(tmp_path)})
    assert "part demo: exit 124" in out.stdout, out.stdout + out.stderr
    assert _json_lines(tmp_path / "demo.jsonl") == [{"bench": "demo", "n": 1}]
    assert "a table line" in (tmp_path / "demo.log").read_text()
    assert "1 JSON lines" in out.stdout


def test_a_part_limit_is_cut_to_what_the_call_has_left(tmp_path):
    out = _source("SECONDS=0; part a 300 true", {"OUT": str(tmp_path), "CALL_LIMIT": "60"})
    # 20 s kept for the kill (bash's SECONDS may tick once between the two commands)
    assert re.search(r"part a: limit 300 s cut to (40|39) s", out.stdout), out.stdout + out.stderr
    assert re.search(r"part a: exit 0 after \d+ s \(limit (40|39) s\)", out.stdout)
    out = _source("SECONDS=0; part b 300 true", {"OUT": str(tmp_path), "CALL_LIMIT": "45"})
    assert re.search(r"part b: skipped, (45|44) s left", out.stdout), out.stdout + out.stderr
    assert not (tmp_path / "b.log").exists()


def test_wheels_bring_the_serving_stack_at_the_versions_the_tests_use():
    listed = _source('echo "${REQUIREMENTS[@]}"').stdout.split()
    pins = dict(item.split("==") for item in listed)
    assert {"transformers", "fastapi", "uvicorn", "httpx"} <= pins.keys()
    for name, version in pins.items():  # the versions the CPU figures and tests ran with
        assert importlib.metadata.version(name) == version, name


def _fake_python(tmp_path: Path) -> Path:
    """A `python` that prints its arguments as a JSON line (the parts' commands, without running them)."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/sh\nprintf \'{"bench": "argv", "argv": "%s"}\\n\' "$*"\n')
    fake.chmod(0o755)
    return fake


def test_the_tests_part_runs_every_file_newest_first_past_collection_errors(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(_fake_python(tmp_path)),
           "WHEELS": str(tmp_path / "no_wheels")}
    run = subprocess.run(["bash", str(SCRIPT), "run", "tests"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    (line,) = _json_lines(tmp_path / "out" / "tests.jsonl")
    argv = line["argv"].split()
    assert argv[:2] == ["-m", "pytest"]
    assert {"--continue-on-collection-errors", "--durations=0", "-rA"} <= set(argv)
    files = [a for a in argv if a.startswith("tests/")]
    assert files == ["tests/test_serve_compile_cuda.py", "tests/test_generation_cuda.py", "tests/test_xattn_cuda.py",
                     "tests/test_tower_graphs.py", "tests/test_train_compile_cuda.py"]
    assert all((ROOT / f).is_file() for f in files)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert f"commit {head}" in (tmp_path / "out" / "versions.txt").read_text()


def test_versions_name_the_commit_that_commit_wrote_in_a_copy_without_git(tmp_path):
    copy = tmp_path / "copy"
    (copy / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, copy / "bench" / "device_checks.sh")
    (copy / ".device_commit").write_text("0123abc + uncommitted changes to tracked files\n")
    env = {"OUT": str(tmp_path / "out"), "PYTHON": str(_fake_python(tmp_path)),
           "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # no repository above the copy
    out = _source("run", env, script=copy / "bench" / "device_checks.sh")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "commit 0123abc + uncommitted changes" in (tmp_path / "out" / "versions.txt").read_text()
    (copy / ".device_commit").unlink()
    out = _source("commit_id", env, script=copy / "bench" / "device_checks.sh")
    assert "commit unknown" in out.stdout


def test_device_commit_travels_with_the_working_tree():
    """Neither tracked nor ignored: the device tool copies untracked, not ignored files."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an archive, the device's copy): nothing decides what travels")
    ignored = subprocess.run(["git", "check-ignore", "-q", ".device_commit"], cwd=ROOT)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", ".device_commit"], cwd=ROOT, capture_output=True)
    assert ignored.returncode == 1 and tracked.returncode != 0


class Cut(Exception):
    """A time limit's SIGINT, in a test."""


def test_bench_train_reports_each_variant_before_the_next_runs(one_thread):
    from bench import train

    args = argparse.Namespace(shape="tiny", batch=1, tokens=16, images=1, xattn_every=1, profile=False,
                              checkpointing=True, compile=False, device="cpu", repeats=1, loss_chunks=0)
    rows = []

    def progress(row):
        rows.append(row)
        if len(rows) == 2:  # cut while the checkpointed variant would run
            raise Cut

    with pytest.raises(Cut):
        train.run(args, progress)
    peer, eager = rows
    assert "openflamingo_step_s" in peer and "ours_step_s" not in peer
    assert eager["ours_step_s"] > 0 and eager["samples_s_vs_openflamingo"] == pytest.approx(
        eager["ours_samples_s"] / eager["openflamingo_samples_s"])
    assert "ours_ckpt_step_s" not in eager


def test_bench_gpu_writes_the_train_rows_so_far_when_cut(monkeypatch, tmp_path, capsys):
    import bench.gpu as gpu

    def cut_run(ns, progress):
        progress({"openflamingo_samples_s": 2.0})
        progress({"openflamingo_samples_s": 2.0, "ours_samples_s": 3.0, "samples_s_vs_openflamingo": 1.5})
        raise KeyboardInterrupt  # the part's limit, during the compiled variant

    monkeypatch.setattr(gpu.train, "run", cut_run)
    out = tmp_path / "gpu-train.json"
    monkeypatch.setattr(sys, "argv", ["bench.gpu", "--shape", "tiny", "--device", "cpu", "--parts", "train",
                                      "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        gpu.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["bench"] for line in lines] == ["gpu.train.partial", "gpu.train.partial"]
    saved = json.loads(out.read_text())
    assert saved["unfinished"] == ["train"]
    assert saved["results"]["train"] == [{"openflamingo_samples_s": 2.0, "ours_samples_s": 3.0,
                                          "samples_s_vs_openflamingo": 1.5}]
    goal = {g["goal"]: g for g in saved["goals"]}["train samples/s vs OpenFlamingo"]
    assert goal["measured"] == 1.5
    # a later call with another part merges in: the cut train part stays marked until a call reruns it
    monkeypatch.setattr(gpu, "run_xattn", lambda ns: [{"images": 4}])
    monkeypatch.setattr(sys, "argv", ["bench.gpu", "--shape", "tiny", "--device", "cpu", "--parts", "xattn",
                                      "--out", str(out)])
    gpu.main()
    saved = json.loads(out.read_text())
    assert saved["unfinished"] == ["train"] and saved["results"]["xattn"] == [{"images": 4}]
    monkeypatch.setattr(gpu, "run_train", lambda ns: [{"ours_samples_s": 4.0}])
    monkeypatch.setattr(sys, "argv", ["bench.gpu", "--shape", "tiny", "--device", "cpu", "--parts", "train",
                                      "--out", str(out)])
    gpu.main()
    assert "unfinished" not in json.loads(out.read_text())


def test_bench_generate_prints_ours_before_timing_the_others(one_thread, capsys):
    from bench.common import build_pair
    from bench.generate import run

    args = argparse.Namespace(dtype="fp32", shots=[1], batch=[1], new_tokens=3, device="cpu", cache="dynamic",
                              compile=False, skip_peer=False, xattn_impl=["auto"], repeats=1, shape="tiny",
                              xattn_every=1, lm="llama")
    (row,) = run(args, build_pair("tiny"))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["bench"] for line in lines] == ["generate.partial", "generate"]
    partial = lines[0]
    assert partial["ours_decode_tok_s"] == row["ours_decode_tok_s"] and partial["same_tokens_as_peer"]
    assert "bare_lm_decode_tok_s" not in partial and "openflamingo_decode_tok_s" not in partial


def test_serve_steps_timings_finish_on_the_device(monkeypatch):
    import bench.serve_steps as serve_steps

    events = []
    monkeypatch.setattr(serve_steps, "sync", lambda device: events.append(("sync", device)))
    serve_steps._seconds(lambda: events.append("call"), 2, "cuda")
    assert events == ["call", ("sync", "cuda")] * 3  # the warm-up and each timed call


@pytest.mark.slow
def test_the_server_compile_test_is_skipped_without_fastapi_and_the_others_still_run(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "fastapi.py").write_text("raise ModuleNotFoundError(\"No module named 'fastapi'\", name='fastapi')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked}:{ROOT}"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                          "--continue-on-collection-errors", "-rA", "tests/test_serve_compile_cuda.py",
                          "tests/test_generation_cuda.py", f"--basetemp={tmp_path / 'bt'}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "error" not in run.stdout.splitlines()[-1], run.stdout[-3000:]
    assert "SKIPPED [1] tests/test_serve_compile_cuda.py" in run.stdout and "need fastapi" in run.stdout
