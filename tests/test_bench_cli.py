"""The bench scripts' command lines fail clearly: a `--device` not usable here is a one-line usage error before any
model is built, `bench.gpu` does not build its large `gpu` shape on a CPU unless asked to, `bench.serve` stops
waiting for a server that died and shows why, and every JSON line is valid JSON (null, never NaN). Nothing here
builds a model larger than the test suite's."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time

import pytest

from bench.common import print_json

DEVICE_SCRIPTS = ["generate", "gpu", "idefics", "memory", "otter", "serve", "serve_prefill", "serve_steps", "train",
                  "xattn"]


class Built(Exception):
    """Raised by a part patched into a script: the script went past its argument checks."""


@pytest.mark.parametrize("script", DEVICE_SCRIPTS)
def test_a_device_torch_does_not_know_is_a_usage_error(script, monkeypatch, capsys):
    module = importlib.import_module(f"bench.{script}")
    monkeypatch.setattr(sys, "argv", [f"bench.{script}", "--device", "gpu"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--device 'gpu': not a device torch knows" in err and "Traceback" not in err


def _refuse_to_build(monkeypatch):
    import bench.gpu as gpu

    def build(args):
        raise Built(args.shape)

    for part in ("run_train", "run_decode", "run_xattn"):
        monkeypatch.setattr(gpu, part, build)
    return gpu


def test_bench_gpu_refuses_the_gpu_shape_on_a_cpu_unless_asked(monkeypatch, capsys):
    gpu = _refuse_to_build(monkeypatch)  # the shape is never built here, whatever the script does
    for argv in (["--device", "cpu"], ["--shape", "gpu", "--device", "cpu", "--parts", "xattn"]):
        monkeypatch.setattr(sys, "argv", ["bench.gpu", *argv])
        with pytest.raises(SystemExit) as exit_:
            gpu.main()
        assert exit_.value.code == 2 and "--large-on-cpu" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["bench.gpu", "--device", "cpu", "--large-on-cpu"])
    with pytest.raises(Built, match="gpu"):  # asked for: it goes on to build it
        gpu.main()
    monkeypatch.setattr(sys, "argv", ["bench.gpu", "--shape", "tiny", "--device", "cpu"])
    with pytest.raises(Built, match="tiny"):
        gpu.main()


def test_json_lines_are_valid_json_with_null_for_nan(capsys):
    print_json("train", {"openflamingo_peak_gib": float("nan"), "rows": [{"ratio": float("inf")}, 1.5]})
    line = capsys.readouterr().out.strip()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(line, parse_constant=refuse) == {"bench": "train", "openflamingo_peak_gib": None,
                                                       "rows": [{"ratio": None}, 1.5]}


def test_waiting_for_a_server_that_died_fails_at_once_with_its_stderr(tmp_path):
    from bench.serve import free_port, wait_until_healthy

    log = tmp_path / "server.stderr"
    with open(log, "wb") as stderr:
        server = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('flamingo: error: no such model')"],
                                  stderr=stderr)
    server.wait(timeout=60)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"exited with code 1 .*\n.*flamingo: error: no such model"):
        wait_until_healthy(f"http://127.0.0.1:{free_port()}", server, str(log))
    assert time.perf_counter() - start < 5


def test_bench_serve_reports_why_its_server_did_not_start(tmp_path):
    """The real `flamingo serve` in a subprocess, given a model directory that does not exist."""
    from bench.serve import serving

    with pytest.raises(RuntimeError, match=r"(?s)exited with code 2 .*flamingo: error: .*model"):
        with serving(["--model", str(tmp_path / "no-model")]):
            pass
