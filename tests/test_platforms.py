"""Where a platform lacks POSIX pieces (Windows: no `fcntl`, no `os.register_at_fork`), imitated here: the data
package still imports and reads local data, remote shards (whose cache is locked with fcntl) are refused by name
when a dataset names them, and a `flamingo data` that cannot import says why instead of vanishing from the CLI."""

from __future__ import annotations

import subprocess
import sys

from flamingo.cli import main

_WINDOWS = """
import os, sys
import torch  # (torch itself registers fork handlers on Linux: imported before they go)
sys.modules["fcntl"] = None  # as on Windows
del os.register_at_fork
from flamingo.cli import main
from flamingo.data.fixtures import make_pairs
pairs = make_pairs(sys.argv[1], 3, bad=False)
print("local", main(["data", "inspect", pairs["path"], "--kind", "pairs"]))
print("remote", main(["data", "inspect", "http://127.0.0.1:9/shard-000000.tar", "--kind", "pairs"]))
"""


def test_local_data_reads_and_remote_shards_are_refused_without_posix_locks(tmp_path):
    out = subprocess.run([sys.executable, "-c", _WINDOWS, str(tmp_path / "p")], capture_output=True, text=True,
                         timeout=300)
    assert "local 0" in out.stdout and "\"samples\": 3" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "remote 2" in out.stdout and "POSIX file locks (fcntl), which this platform lacks" in out.stderr


def test_a_data_package_that_cannot_import_is_said_by_flamingo_data(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flamingo.data.cli", None)  # an import of it fails
    assert main(["data", "inspect", "pairs.jsonl", "--kind", "pairs"]) == 2
    assert "`flamingo data` cannot run here: its package did not import (ModuleNotFoundError: import of " \
        "flamingo.data.cli" in capsys.readouterr().err
