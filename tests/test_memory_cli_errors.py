"""Memory options this machine cannot run end `flamingo train` as other bad options do: one `flamingo: error:` line
and exit code 2, before any file of the run is written."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torchao")

from flamingo.cli import main  # noqa: E402

from train_fixtures import save_backbones, train_config, write_datasets  # noqa: E402


def test_adamw8bit_without_a_cpp_compiler_is_a_one_line_error(tmp_path, monkeypatch, capsys, one_thread):
    """It was a RuntimeError: a 15-line traceback and exit code 1."""
    root = str(tmp_path)
    vision, lm = save_backbones(root)
    data = write_datasets(os.path.join(root, "data"), n_pairs=4, n_docs=2)
    out = os.path.join(root, "run")
    path = train_config(root, vision, lm, data, steps=1, out=out, interleaved=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert main(["train", path, "optim.kind=adamw8bit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flamingo: error: optim.kind=adamw8bit compiles its update with torch.compile")
    assert "Traceback" not in "\n".join(err) and not os.path.exists(os.path.join(out, "checkpoints"))
